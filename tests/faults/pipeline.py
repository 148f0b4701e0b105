"""harness.pipeline.LocalPipeline with what the fault scenarios add to it.

(LocalPipeline itself takes `worker_app`, the fault suite's worker app, and `durable_broker`, Redis
with AOF and `appendfsync always`, so a restart keeps the queue, the unacked messages and the dedup
records, as a production broker must.)
- more listener processes (a standby) that it stops with the rest and whose logs it includes.
- the broker's backlog (queued plus unacked messages), to know when redeliveries are over.
- a parallel shutdown: stopping 2 Celery workers one after the other costs seconds per scenario.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import redis

from harness.pipeline import LocalPipeline
from harness.processes import ManagedProcess, listener_process

# kombu's Redis transport: the queue is a list named after it (plus priority lists "celery\x06\x16N"),
# messages delivered but not acked yet live in the hash "unacked" until ack or visibility timeout.
QUEUE_PATTERN = "celery*"
UNACKED = "unacked"


class FaultPipeline(LocalPipeline):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extra_listeners: list[ManagedProcess] = []
        self.crashes: list[str] = []  # what the supervisor restarted: "worker1: <last error line>"
        self._supervising = threading.Event()
        self._supervisor: threading.Thread | None = None

    def __enter__(self) -> FaultPipeline:
        self.start()
        return self

    def start_listener(self, *args: str, name: str = "listener") -> ManagedProcess:
        return super().start_listener(*args, *self._health_file(name), name=name)

    def listener_process(self, *args: str, name: str, ready: str | None = "listener ready") -> ManagedProcess:
        """A further `python -m listener` (not started), stopped and logged with the pipeline."""
        process = listener_process(self.env, *args, *self._health_file(name), log_dir=self.log_dir, name=name)
        process.ready = None if ready is None else re.compile(ready)
        self.extra_listeners.append(process)
        return process

    def supervise(self) -> None:
        """Restart any worker process that exits, as systemd (Restart=always) or compose would."""
        self._supervising.set()
        self._supervisor = threading.Thread(target=self._supervise, name="fault-supervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        while self._supervising.wait(0.5) and self._supervising.is_set():
            for worker in self.workers:
                if self._supervising.is_set() and worker.process is not None and not worker.running:
                    lines = [line for line in worker.log_text().splitlines() if "Unrecoverable error" in line]
                    why = lines[-1][:160] if lines else f"exit code {worker.process.returncode}"
                    self.crashes.append(f"{worker.name}: {why}")
                    worker.start(timeout=60)

    def _health_file(self, name: str) -> list[str]:
        # The default (/tmp/changeflow-listener-<stream>.json) would be shared by every listener here.
        return ["--health-file", str(self.log_dir / f"{name}.health.json")]

    def stop(self) -> None:
        self._supervising.clear()
        if self._supervisor is not None:
            self._supervisor.join(timeout=70)
        processes = [p for p in [self.listener, *self.extra_listeners, *self.workers] if p is not None]
        threads = [threading.Thread(target=p.stop, kwargs={"timeout": 15}) for p in processes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        super().stop()

    def broker_backlog(self) -> int | None:
        """Messages queued or delivered-but-unacked in the broker; None while it is unreachable."""
        client = self.redis_client(socket_timeout=2, socket_connect_timeout=1)
        try:
            total = int(client.hlen(UNACKED))
            for key in client.scan_iter(match=QUEUE_PATTERN):
                if client.type(key) == b"list":
                    total += int(client.llen(key))
            return total
        except redis.RedisError:
            return None
        finally:
            client.close()

    def logs(self) -> str:
        parts = [super().logs()]
        for process in self.extra_listeners:
            parts.append(f"===== {process.name}\n{process.log_text(since_start=False)[-3000:]}")
        if self.mongo is not None:
            parts.append(f"===== mongo_double\n{self.mongo.log_text(since_start=False)[-1500:]}")
        if self.redis is not None:
            redis_log = self.redis.dir / "redis.log"
            if redis_log.exists():
                parts.append(f"===== redis-server\n{redis_log.read_text(errors='replace')[-1500:]}")
        if self.sentinel is not None:
            parts.append(self.sentinel.logs())
        return "\n".join(parts)
