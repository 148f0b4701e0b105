"""A Sentinel-managed Redis on free ports: a master, a replica and sentinels, in temporary dirs.

`redis-sentinel` is Debian's package (redis-server in sentinel mode, scripts/install.sh installs it);
the sentinels run as `redis-server sentinel.conf --sentinel`. Failure detection is fast for tests
(down-after-milliseconds 1000), so a SIGKILLed master is replaced within a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

from harness.ports import free_port
from harness.redis_server import RedisServer

MASTER_NAME = "changeflow"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class RedisSentinelGroup:
    """`servers` redis-servers (the first starts as master, the others replicate it) and `sentinels`
    sentinels monitoring them as MASTER_NAME. With `appendonly`, every server keeps an AOF
    (appendfsync always), as a durable broker does. Stops only what it started; never port 6379."""

    def __init__(
        self, *, servers: int = 2, sentinels: int = 3, appendonly: bool = True, name: str = MASTER_NAME
    ) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-sentinel") is None:
            raise FileNotFoundError(
                "redis-server and redis-sentinel are needed: install the Debian packages redis-server and "
                "redis-sentinel (scripts/install.sh does)"
            )
        self.name = name
        self.appendonly = appendonly
        self.server_count = servers
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.quorum = sentinels // 2 + 1
        self.dir = Path(tempfile.mkdtemp(prefix="changeflow-sentinel-"))
        self.servers: list[RedisServer] = []
        self.sentinel_processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """kombu's form: `sentinel://host:port;sentinel://host:port...` (the database: 0)."""
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.sentinel_ports)

    @property
    def env(self) -> dict[str, str]:
        """changeflow's settings for this Redis: broker and dedup store through the sentinels."""
        return {"CELERY_BROKER_URL": self.url, "REDIS_URL": self.url, "REDIS_SENTINEL_MASTER": self.name}

    # -- start and stop ---------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> RedisSentinelGroup:
        try:
            master = RedisServer(appendonly=self.appendonly).start()
            self.servers.append(master)
            for _ in range(self.server_count - 1):
                replica = RedisServer(
                    appendonly=self.appendonly, options=("--replicaof", "127.0.0.1", str(master.port))
                )
                self.servers.append(replica.start())
            self._wait("the replicas are in sync", self._replicas_synced, timeout)
            for port in self.sentinel_ports:
                self._start_sentinel(port, master.port)
            # Each sentinel must know every replica and the other sentinels before a failover can work.
            self._wait("the sentinels know the replicas and each other", self._sentinels_ready, timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _start_sentinel(self, port: int, master_port: int) -> None:
        directory = self.dir / f"sentinel-{port}"
        directory.mkdir()
        conf = directory / "sentinel.conf"  # sentinels rewrite their config: a file of their own
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {directory}\nlogfile {directory / 'sentinel.log'}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {master_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {self.name} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {self.name} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {self.name} 1\n"
        )
        process = subprocess.Popen(
            ["redis-sentinel", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.sentinel_processes.append(process)

    def close(self) -> None:
        for process in self.sentinel_processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.sentinel_processes = []
        for server in self.servers:
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisSentinelGroup:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()

    # -- observing and faults ---------------------------------------------------------------
    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it; None if none answers."""
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, host="127.0.0.1", socket_timeout=1, socket_connect_timeout=1)
            try:
                address = client.sentinel_get_master_addr_by_name(self.name)
                if address:
                    return int(address[1])
            except redis.RedisError:
                continue
            finally:
                client.close()
        return None

    def master(self) -> RedisServer:
        """The server that is master now (per the sentinels)."""
        port = self.master_port()
        for server in self.servers:
            if server.port == port:
                return server
        raise RuntimeError(f"no server of the group on the master's port {port}")

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master; returns it (its `start()` brings it back, as a replica)."""
        victim = self.master()
        victim.kill()
        return victim

    def wait_for_new_master(self, old_port: int, timeout: float = 60.0) -> int:
        """Until the sentinels name a master other than `old_port` that answers as master; its port."""
        found: list[int] = []

        def promoted() -> bool:
            port = self.master_port()
            if port is None or port == old_port:
                return False
            found[:] = [port]
            return _role(port) == "master"

        self._wait(f"a master other than {old_port}", promoted, timeout)
        return found[0]

    def logs(self) -> str:
        parts = []
        for server in self.servers:
            log = server.dir / "redis.log"
            if log.exists():
                parts.append(f"===== redis-server {server.port}\n{log.read_text(errors='replace')[-1500:]}")
        for port in self.sentinel_ports:
            log = self.dir / f"sentinel-{port}" / "sentinel.log"
            if log.exists():
                parts.append(f"===== sentinel {port}\n{log.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)

    def _replicas_synced(self) -> bool:
        return all(_info(s.port, "master_link_status") == "up" for s in self.servers[1:])

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, host="127.0.0.1", socket_timeout=1, socket_connect_timeout=1)
            try:
                replicas = client.sentinel_slaves(self.name)
                others = client.sentinel_sentinels(self.name)
            except redis.RedisError:
                return False
            finally:
                client.close()
            healthy = [
                r for r in replicas if "s_down" not in r.get("flags", "") and r.get("is_odown") is not True
            ]
            if len(healthy) < self.server_count - 1 or len(others) < len(self.sentinel_ports) - 1:
                return False
        return True

    def _wait(self, what: str, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis sentinel group: timed out waiting until {what}\n{self.logs()}")
            time.sleep(0.1)


def _info(port: int, field: str) -> str | None:
    client = redis.Redis(port=port, host="127.0.0.1", socket_timeout=1, socket_connect_timeout=1)
    try:
        value = client.info("replication").get(field)
        return None if value is None else str(value)
    except redis.RedisError:
        return None
    finally:
        client.close()


def _role(port: int) -> str | None:
    return _info(port, "role")
