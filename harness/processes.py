"""Start changeflow's own processes (and the MongoDB test server) as real subprocesses.

Each process writes stdout and stderr to a log file of its own; readiness is a line in that log.
Tests, the quickstart demo, benchmarks and the fault suite all start processes through here.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class ManagedProcess:
    """A subprocess with a log file, started on demand and stopped politely (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        ready: str | None = None,
        log_dir: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cwd = cwd or REPO_ROOT  # another directory: a team's package outside this repository
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ready = re.compile(ready) if ready else None
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="changeflow-logs-"))
        self.log_path = self.log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, timeout: float = 30.0) -> ManagedProcess:
        """Start it and, when a ready pattern is given, wait until a new log line matches it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if self.ready is not None:
            self.wait_for_log(self.ready, timeout=timeout)
        return self

    def log_text(self, since_start: bool = True) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            if since_start:
                f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} before logging {regex.pattern!r}:\n"
                    + self.log_text()[-4000:]
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} did not log {regex.pattern!r} within {timeout}s:\n"
                    + self.log_text()[-4000:]
                )
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group (a Celery worker's pool children too): a crash."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL what is left of the process group."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        code = self.process.poll()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return code


def python_module(name: str, module: str, *args: str, **kwargs: object) -> ManagedProcess:
    """`python -m module args...` with this interpreter."""
    return ManagedProcess(name, [sys.executable, "-m", module, *args], **kwargs)  # type: ignore[arg-type]


def mongo_double_process(*, log_dir: Path | None = None, oplog_size: int | None = None) -> ManagedProcess:
    args = ["--port", "0"] + (["--oplog-size", str(oplog_size)] if oplog_size else [])
    return python_module(
        "mongo_double",
        "changeflow.testing.mongo_double",
        *args,
        ready=r"ready (mongodb://\S+)",
        log_dir=log_dir,
    )


def mongo_double_uri(process: ManagedProcess) -> str:
    return process.wait_for_log(r"ready (mongodb://\S+)").group(1)


def listener_process(
    env: Mapping[str, str],
    *args: str,
    log_dir: Path | None = None,
    name: str = "listener",
    cwd: Path | None = None,
) -> ManagedProcess:
    """`python -m listener args...` (`-A MODULE` among the args selects another app)."""
    return python_module(name, "listener", *args, env=env, ready=r"listener ready", log_dir=log_dir, cwd=cwd)


def worker_process(
    env: Mapping[str, str],
    name: str,
    *,
    app: str = "worker",
    concurrency: int = 2,
    log_dir: Path | None = None,
    cwd: Path | None = None,
    queues: Sequence[str] = (),
    pool: str | None = None,
) -> ManagedProcess:
    """`celery -A <app> worker` (app: changeflow's `worker`, a test app built on it, or a team's);
    `queues`: the queues it consumes (`-Q`), else Celery's default queue; `pool`: its `-P` (threads,
    gevent, ...), else Celery's default (prefork)."""
    args = [
        "-A", app, "worker", "--loglevel", "INFO", "--concurrency", str(concurrency),
        "--hostname", f"{name}@%h", "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    if queues:
        args += ["-Q", ",".join(queues)]
    if pool:
        args += ["-P", pool]
    return python_module(name, "celery", *args, env=env, ready=r"ready\.", log_dir=log_dir, cwd=cwd)


def realtime_process(
    env: Mapping[str, str], *, log_dir: Path | None = None, name: str = "realtime"
) -> ManagedProcess:
    """`python -m realtime`: the Socket.IO gateway (REALTIME_* settings in `env`); its address is
    realtime_url(process)."""
    return python_module(name, "realtime", env=env, ready=REALTIME_READY, log_dir=log_dir)


REALTIME_READY = r"realtime gateway ready on (http://\S+)"


def realtime_url(process: ManagedProcess) -> str:
    return process.wait_for_log(REALTIME_READY).group(1)


def console_process(
    env: Mapping[str, str], *, log_dir: Path | None = None, name: str = "console"
) -> ManagedProcess:
    """`python -m changeflow console -A worker --port 0` (CONSOLE_* settings in `env`); its address is
    console_url(process)."""
    return python_module(
        name, "changeflow", "console", "-A", "worker", "--port", "0", env=env, ready=CONSOLE_READY,
        log_dir=log_dir,
    )  # fmt: skip


CONSOLE_READY = r"changeflow console ready on (http://\S+)"


def console_url(process: ManagedProcess) -> str:
    return process.wait_for_log(CONSOLE_READY).group(1)


def flower_process(env: Mapping[str, str], port: int, *, log_dir: Path | None = None) -> ManagedProcess:
    args = ["-A", "worker", "flower", f"--port={port}", "--address=127.0.0.1"]
    return python_module("flower", "celery", *args, env=env, ready=r"Visit me at|Registered", log_dir=log_dir)
