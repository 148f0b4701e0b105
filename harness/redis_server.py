"""A private redis-server on a free port, which tests may stop and restart to inject faults."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis

from changeflow.worker.redis_conn import parse_redis_url
from harness.ports import free_port
from harness.tls import TlsFiles


class RedisServer:
    """Runs `redis-server` on 127.0.0.1 and a port of its own; the data lives in a temporary dir.

    Persistence is off by default: stop() loses the data, as a crashed broker without AOF would;
    restart() comes back on the same port so clients reconnect. With `appendonly=True` every write is
    in the append-only file before Redis answers (`appendfsync always`) and a restart comes back with
    the data: a durable broker. With `tls` (harness.tls.make_certificates) it serves TLS only
    (`--tls-port`, `--port 0`) and `url` is a rediss:// URL that trusts that CA. `options` are further
    redis-server options, e.g. `("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")` or
    `("--replicaof", "127.0.0.1", PORT)`.
    """

    def __init__(
        self,
        port: int | None = None,
        executable: str = "redis-server",
        *,
        appendonly: bool = False,
        tls: TlsFiles | None = None,
        options: Sequence[str] = (),
    ) -> None:
        path = shutil.which(executable)
        if path is None:
            raise FileNotFoundError(
                f"{executable} not found: install the Debian package redis-server (scripts/install.sh does)"
            )
        self.executable = path
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="changeflow-redis-"))
        self.appendonly = appendonly
        self.tls = tls
        self.options = list(options)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **options: object) -> redis.Redis:
        """A client of this server (TLS included), as changeflow makes them."""
        return parse_redis_url(self.url).client(**options)

    def start(self, timeout: float = 10.0) -> RedisServer:
        persistence = ["--appendonly", "no"]
        if self.appendonly:
            persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ports = [
                "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        args = [
            self.executable, *ports, "--bind", "127.0.0.1", "--save", "", *persistence,
            "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"), *self.options,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client(socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}") from None
                time.sleep(0.05)
            finally:
                client.close()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last write to disk (what AOF with appendfsync always survives)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()
