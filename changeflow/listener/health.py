"""Liveness and readiness of a listener process: a heartbeat file and `python -m listener health`.

The watch loop writes a small JSON file (LISTENER_HEALTH_FILE, default
`/tmp/changeflow-listener-<stream>.json`), replaced atomically, at most once a second:

    {"pid", "stream", "owner", "role": "starting"|"standby"|"active", "epoch",
     "last_heartbeat", "last_progress", "written_at",      # times: Unix seconds (float), or null
     "paused": null | {"since", "queued", "limit"}}

- `last_heartbeat`: the loop made a turn: a getMore returned (active) or a lease poll ran (standby);
- `last_progress`: a checkpoint was saved;
- `paused`: the listener stopped reading because the broker's queue reached LISTENER_MAX_QUEUE_LENGTH
  (changeflow/listener/backpressure.py): since when, the queue's length at the last look, the bound. A paused
  listener keeps its heartbeat: it is healthy, and `health` says it is paused.

A loop that is blocked (a hung getMore, a process stopped with SIGSTOP, a broker outage that keeps
the batch waiting) stops writing heartbeats; so `health` turns unhealthy after --max-stall seconds
even though the process is alive.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2
WRITE_EVERY = 1.0  # seconds between heartbeat writes (a role change is written at once)


def default_path(stream: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stream)
    return Path(tempfile.gettempdir()) / f"changeflow-listener-{safe}.json"


class HealthFile:
    """Written by the listener's loop (never by a background thread: it must reflect the loop)."""

    def __init__(self, path: Path | str, stream: str, owner: str | None = None) -> None:
        self.path = Path(path)
        self.state: dict[str, Any] = {
            "pid": os.getpid(),
            "stream": stream,
            "owner": owner,
            "role": "starting",
            "epoch": None,
            "last_heartbeat": time.time(),
            "last_progress": None,
            "paused": None,
        }
        self._written = 0.0

    def heartbeat(self, role: str, epoch: int | None = None) -> None:
        changed = role != self.state["role"] or epoch != self.state["epoch"]
        self.state.update(role=role, epoch=epoch, last_heartbeat=time.time())
        if changed or time.monotonic() - self._written >= WRITE_EVERY:
            self.write()

    def paused(self, queued: int, limit: int) -> None:
        """Reading is paused by backpressure; written at once when it starts, then with heartbeats."""
        started = self.state["paused"] is None
        since = time.time() if started else self.state["paused"]["since"]
        self.state["paused"] = {"since": since, "queued": queued, "limit": limit}
        if started:
            self.write()

    def resumed(self) -> None:
        if self.state["paused"] is not None:
            self.state["paused"] = None
            self.write()

    def check_writable(self) -> None:
        """Write the file now; OSError when it cannot be written (for a start-up check)."""
        self.write(raise_errors=True)

    def progress(self) -> None:
        self.state["last_progress"] = time.time()

    def write(self, raise_errors: bool = False) -> None:
        self._written = time.monotonic()
        document = {**self.state, "written_at": time.time()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(document))
            os.replace(temporary, self.path)
        except OSError:  # once running, a health file that cannot be written must not stop the stream
            if raise_errors:
                raise

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check(path: Path, max_stall: float, ready: bool = False, now: float | None = None) -> tuple[bool, str]:
    """(healthy, one-line reason) for the listener whose health file is `path`."""
    now = time.time() if now is None else now
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return False, f"unhealthy: no health file {path} (listener not started, or stopped)"
    except (OSError, ValueError) as exc:
        return False, f"unhealthy: cannot read health file {path}: {exc}"
    pid, role, epoch = state.get("pid"), state.get("role"), state.get("epoch")
    who = f"pid {pid}, stream {state.get('stream')}, {role}" + (f" (epoch {epoch})" if epoch else "")
    if isinstance(pid, int) and not _alive(pid):
        return False, f"unhealthy: process {pid} is not running ({who})"
    heartbeat = state.get("last_heartbeat")
    if not isinstance(heartbeat, int | float):
        return False, f"unhealthy: no heartbeat recorded ({who})"
    stalled = now - heartbeat
    progress = state.get("last_progress")
    progress_text = "never" if not isinstance(progress, int | float) else f"{now - progress:.1f}s ago"
    if stalled > max_stall:
        return False, (
            f"unhealthy: stalled, no heartbeat for {stalled:.1f}s (max {max_stall:g}s); "
            f"last checkpoint {progress_text} ({who})"
        )
    if ready and role != "active":
        return False, f"not ready: {role}, not the active listener ({who})"
    paused = state.get("paused")
    if isinstance(paused, dict):
        since = paused.get("since")
        how_long = f" for {now - since:.1f}s" if isinstance(since, int | float) else ""
        who += (
            f"; paused{how_long}: broker queue {paused.get('queued')} messages, "
            f"LISTENER_MAX_QUEUE_LENGTH {paused.get('limit')}"
        )
    return True, f"healthy: heartbeat {stalled:.1f}s ago, last checkpoint {progress_text} ({who})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m listener health",
        description="Check a listener's heartbeat file; prints one line. For Docker HEALTHCHECK and probes.",
        epilog="exit codes: 0 healthy (and active with --ready), 1 unhealthy or not ready, 2 usage",
    )
    parser.add_argument("--stream-name", help="whose default health file to read (LISTENER_STREAM_NAME)")
    parser.add_argument("--health-file", metavar="PATH", help="the file to read (LISTENER_HEALTH_FILE)")
    parser.add_argument(
        "--max-stall",
        type=float,
        metavar="SECONDS",
        help="longest accepted time without a heartbeat (default: LISTENER_MAX_STALL_SECONDS, 30)",
    )
    parser.add_argument("--ready", action="store_true", help="also require the active role (not a standby)")
    args = parser.parse_args(argv)
    try:
        from changeflow.worker.settings import Settings

        settings = Settings.from_env()  # not get_settings(): no worker app configuration needed
    except ValueError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stream = args.stream_name or settings.listener_stream_name
    path = Path(args.health_file or settings.listener_health_file or default_path(stream))
    max_stall = args.max_stall if args.max_stall is not None else settings.listener_max_stall_seconds
    healthy, reason = check(path, max_stall, ready=args.ready)
    print(reason)
    return EXIT_HEALTHY if healthy else EXIT_UNHEALTHY
