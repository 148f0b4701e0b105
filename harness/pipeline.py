"""The whole pipeline on this machine, with real processes on free ports.

redis-server (broker and dedup store), MongoDB (MONGODB_URI when given, else the MongoDB test
server as a subprocess), an SMTP sink, `python -m listener`, N `celery -A worker worker` processes
and optionally Flower. Used by the end-to-end tests, the quickstart demo, the fault suite and the
benchmarks.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pymongo
import redis
from pymongo.database import Database

from changeflow.worker.redis_conn import parse_redis_url
from harness.ports import free_port
from harness.processes import (
    ManagedProcess,
    console_process,
    console_url,
    flower_process,
    listener_process,
    mongo_double_process,
    mongo_double_uri,
    realtime_process,
    realtime_url,
    worker_process,
)
from harness.redis_sentinel import RedisSentinelGroup
from harness.redis_server import RedisServer
from harness.smtp_sink import SmtpSink
from harness.tls import make_certificates


class LocalPipeline:
    def __init__(
        self,
        *,
        workers: int = 2,
        worker_concurrency: int = 2,
        flower_port: int | None = None,
        mongodb_uri: str | None = None,
        oplog_size: int | None = None,
        extra_env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        worker_app: str = "worker",
        durable_broker: bool = False,
        redis_tls: bool = False,
        sentinel: bool = False,
        realtime_port: int | None = None,
        realtime_demo: bool = False,
        console: bool = False,
        metrics: bool = False,
        worker_pool: str | None = None,
    ) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="changeflow-run-"))
        self.worker_count = workers
        self.worker_concurrency = worker_concurrency
        self.worker_pool = worker_pool  # the workers' -P (threads, gevent); None: prefork
        self.flower_port = flower_port
        self.oplog_size = oplog_size
        self.extra_env = extra_env or {}
        # A test app built on worker.app (the fault suite's), and Redis with AOF (appendfsync always).
        self.worker_app = worker_app
        self.durable_broker = durable_broker
        # Redis serving TLS only, with a private CA the URLs name (ssl_ca_certs); or a Sentinel group
        # (master + replica + 3 sentinels, harness.redis_sentinel) instead of one redis-server.
        self.redis_tls = redis_tls
        self.use_sentinel = sentinel
        self.sentinel: RedisSentinelGroup | None = None
        # The realtime gateway (`python -m realtime`) on this port (0: any free one), when not None;
        # its own token secret, and the demo sign-in when asked for.
        self.realtime_port = realtime_port
        self.realtime_demo = realtime_demo
        self.realtime_secret = secrets.token_urlsafe(32)
        self.realtime: ManagedProcess | None = None
        self.realtime_url = ""
        # The operator console (`changeflow console`, 127.0.0.1, any free port) with a password of its own.
        self.want_console = console
        self.console_password = secrets.token_urlsafe(18)
        self.console: ManagedProcess | None = None
        self.console_url = ""
        # A real server is shared: work in a database of our own and drop only that one.
        self.external_mongodb_uri = mongodb_uri if mongodb_uri is not None else os.environ.get("MONGODB_URI")
        self.db_name = f"changeflow_{uuid.uuid4().hex[:10]}" if self.external_mongodb_uri else "changeflow"
        self.redis: RedisServer | None = None
        self.mongo: ManagedProcess | None = None
        self.mongodb_uri = ""
        self.sink: SmtpSink | None = None
        self.listener: ManagedProcess | None = None
        self.workers: list[ManagedProcess] = []
        self.flower: ManagedProcess | None = None
        self.client: pymongo.MongoClient | None = None
        # /metrics of the listener and of each worker, on ports of their own (kept across restarts).
        self.metrics = metrics
        self.metrics_ports: dict[str, int] = {}

    # -- start and stop ---------------------------------------------------------------------
    def start(self, *, listener: bool = True) -> LocalPipeline:
        try:
            if self.use_sentinel:
                self.sentinel = RedisSentinelGroup(appendonly=self.durable_broker).start()
            else:
                tls = make_certificates(self.log_dir / "tls") if self.redis_tls else None
                self.redis = RedisServer(appendonly=self.durable_broker, tls=tls).start()
            if self.external_mongodb_uri:
                self.mongodb_uri = self.external_mongodb_uri
            else:
                self.mongo = mongo_double_process(log_dir=self.log_dir, oplog_size=self.oplog_size).start()
                self.mongodb_uri = mongo_double_uri(self.mongo)
            self.client = pymongo.MongoClient(self.mongodb_uri, serverSelectionTimeoutMS=10_000)
            self.sink = SmtpSink(port=0)
            self.sink.start()
            for i in range(self.worker_count):
                self.start_worker(f"worker{i + 1}")
            if self.flower_port is not None:
                self.flower = flower_process(self.env, self.flower_port, log_dir=self.log_dir).start()
            if self.realtime_port is not None:
                self.start_realtime()
            if self.want_console:
                self.start_console()
            if listener:
                self.start_listener()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def redis_env(self) -> dict[str, str]:
        """The broker and dedup store settings: the one redis-server, or the Sentinel group."""
        if self.sentinel is not None:
            return self.sentinel.env
        assert self.redis is not None, "pipeline not started"
        return {"CELERY_BROKER_URL": self.redis.url, "REDIS_URL": self.redis.url}

    def redis_client(self, **options: object) -> redis.Redis:
        """A client of the broker's Redis (through the sentinels: the current master)."""
        env = self.redis_env
        target = parse_redis_url(env["CELERY_BROKER_URL"], master_name=env.get("REDIS_SENTINEL_MASTER", ""))
        return target.client(**options)

    @property
    def env(self) -> dict[str, str]:
        assert self.sink is not None, "pipeline not started"
        return {
            "MONGODB_URI": self.mongodb_uri,
            "MONGODB_DB": self.db_name,
            **self.redis_env,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.sink.port),
            **self.extra_env,
        }

    def start_listener(self, *args: str, name: str = "listener") -> ManagedProcess:
        env = {**self.env, **self._metrics_env("LISTENER_METRICS_PORT", name)}
        self.listener = listener_process(env, *args, log_dir=self.log_dir, name=name).start()
        return self.listener

    def start_realtime(self) -> ManagedProcess:
        env = {
            **self.env,
            "REALTIME_SECRET": self.realtime_secret,
            "REALTIME_PORT": str(self.realtime_port or 0),
            "REALTIME_DEMO": "1" if self.realtime_demo else "0",
        }
        self.realtime = realtime_process(env, log_dir=self.log_dir).start()
        self.realtime_url = realtime_url(self.realtime)
        return self.realtime

    def start_console(self) -> ManagedProcess:
        env = {**self.env, "CONSOLE_USER": "admin", "CONSOLE_PASSWORD": self.console_password}
        if self.flower_port is not None:
            env["FLOWER_URL"] = f"http://127.0.0.1:{self.flower_port}/"
        self.console = console_process(env, log_dir=self.log_dir).start()
        self.console_url = console_url(self.console)
        return self.console

    def start_worker(self, name: str) -> ManagedProcess:
        env = {**self.env, **self._metrics_env("WORKER_METRICS_PORT", name)}
        worker = worker_process(
            env, name, app=self.worker_app, concurrency=self.worker_concurrency, log_dir=self.log_dir,
            pool=self.worker_pool,
        )  # fmt: skip
        self.workers.append(worker.start(timeout=60))
        return worker

    def _metrics_env(self, variable: str, name: str) -> dict[str, str]:
        if not self.metrics:
            return {}
        port = self.metrics_ports.setdefault(name, free_port())
        return {variable: str(port)}

    def metrics_url(self, name: str) -> str:
        """The /metrics address of the listener or worker started as `name` (metrics=True)."""
        return f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"

    def stop(self) -> None:
        for process in [self.listener, self.flower, self.realtime, self.console, *self.workers]:
            if process is not None:
                process.stop()
        if self.sink is not None:
            self.sink.stop()
        if self.client is not None:
            if self.external_mongodb_uri:
                self.client.drop_database(self.db_name)
            self.client.close()
        if self.mongo is not None:
            self.mongo.stop()
        if self.redis is not None:
            self.redis.close()
        if self.sentinel is not None:
            self.sentinel.close()

    def __enter__(self) -> LocalPipeline:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()

    # -- observing --------------------------------------------------------------------------
    @property
    def db(self) -> Database:
        assert self.client is not None, "pipeline not started"
        return self.client[self.db_name]

    def logs(self) -> str:
        """Every process log, for a failing test's message."""
        return "\n".join(
            f"===== {p.name}\n{p.log_text(since_start=False)[-3000:]}"
            for p in [self.listener, *self.workers, self.realtime, self.console]
            if p is not None
        )


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll condition until it holds or timeout passes; returns whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
