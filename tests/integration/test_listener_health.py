"""`python -m listener health` against real listener processes: healthy, stalled (SIGSTOP), standby."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from changeflow.listener.exit_codes import EXIT_OK
from tests.integration import test_listener_cli as cli
from tests.integration.test_listener import wait_for
from tests.integration.test_listener_cli import ROOT, Process

env = cli.env  # fixtures shared with the CLI tests
processes = cli.processes


def health(env: dict[str, str], path: Path, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "listener", "health", "--health-file", str(path), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode, done.stdout.strip()


def test_healthy_while_running_unhealthy_when_stalled(
    env: dict[str, str], processes: list[Process], tmp_path: Path
) -> None:
    path = tmp_path / "listener.json"
    assert health(env, path)[0] == 1  # not started: no file
    listener = Process({**env, "LISTENER_HEALTH_FILE": str(path)})
    processes.append(listener)
    listener.wait_for_line("listener ready")
    code, line = health(env, path, "--max-stall", "2", "--ready")
    assert code == 0 and line.startswith("healthy:") and "active (epoch 1)" in line

    os.kill(listener.popen.pid, signal.SIGSTOP)  # alive, but the loop makes no progress
    try:
        time.sleep(2.5)
        code, line = health(env, path, "--max-stall", "2")
        assert code == 1 and line.startswith("unhealthy: stalled, no heartbeat for"), line
    finally:
        os.kill(listener.popen.pid, signal.SIGCONT)
    wait_for(lambda: health(env, path, "--max-stall", "2")[0] == 0, "healthy again", timeout=10)

    listener.popen.terminate()
    assert listener.finish() == EXIT_OK
    code, line = health(env, path)
    assert code == 1 and "is not running" in line


def test_a_standby_is_healthy_but_not_ready(
    env: dict[str, str], processes: list[Process], tmp_path: Path
) -> None:
    active = Process({**env, "LISTENER_HEALTH_FILE": str(tmp_path / "a.json")})
    processes.append(active)
    active.wait_for_line("listener ready")
    standby = Process({**env, "LISTENER_HEALTH_FILE": str(tmp_path / "b.json")})
    processes.append(standby)
    standby.wait_for_line("listener standby")
    code, line = health({**env, "LISTENER_MAX_STALL_SECONDS": "5"}, tmp_path / "b.json")
    assert code == 0 and "standby" in line
    code, line = health(env, tmp_path / "b.json", "--ready")
    assert code == 1 and line.startswith("not ready: standby")
    for process in (standby, active):
        process.popen.terminate()
        assert process.finish() == EXIT_OK
