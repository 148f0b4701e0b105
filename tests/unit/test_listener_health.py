"""The health check's decision, on hand-written heartbeat files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from changeflow.listener.health import HealthFile, check, default_path


def write(path: Path, **state: object) -> Path:
    path.write_text(json.dumps({"pid": os.getpid(), "stream": "s", "role": "active", "epoch": 3, **state}))
    return path


def test_recent_heartbeat_is_healthy_and_ready_needs_the_active_role(tmp_path: Path) -> None:
    path = write(tmp_path / "h.json", last_heartbeat=1000.0, last_progress=999.0)
    healthy, reason = check(path, max_stall=30, now=1010.0)
    assert healthy and reason.startswith("healthy: heartbeat 10.0s ago, last checkpoint 11.0s ago")
    assert check(path, max_stall=30, ready=True, now=1010.0)[0]
    write(path, role="standby", epoch=None, last_heartbeat=1000.0)
    healthy, reason = check(path, max_stall=30, now=1010.0)
    assert healthy  # alive and polling
    healthy, reason = check(path, max_stall=30, ready=True, now=1010.0)
    assert not healthy and reason.startswith("not ready: standby")


def test_stalled_loop_is_unhealthy_even_though_the_process_lives(tmp_path: Path) -> None:
    path = write(tmp_path / "h.json", last_heartbeat=1000.0, last_progress=None)
    healthy, reason = check(path, max_stall=30, now=1031.0)
    assert not healthy
    assert reason.startswith("unhealthy: stalled, no heartbeat for 31.0s (max 30s); last checkpoint never")


def test_missing_file_or_dead_process_is_unhealthy(tmp_path: Path) -> None:
    healthy, reason = check(tmp_path / "none.json", max_stall=30)
    assert not healthy and "no health file" in reason
    path = write(tmp_path / "h.json", pid=2**22 + 12345, last_heartbeat=1000.0)  # above pid_max
    healthy, reason = check(path, max_stall=30, now=1001.0)
    assert not healthy and "is not running" in reason


def test_health_file_is_written_on_role_changes_and_at_most_once_a_second(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    health = HealthFile(path, "s", owner="me")
    health.heartbeat("standby")
    assert json.loads(path.read_text())["role"] == "standby"
    health.heartbeat("active", 2)  # a role change: written at once
    first = json.loads(path.read_text())
    assert (first["role"], first["epoch"], first["owner"]) == ("active", 2, "me")
    health.progress()
    health.heartbeat("active", 2)  # within a second: not written again
    assert json.loads(path.read_text())["last_progress"] is None
    assert default_path("a/b").name == "changeflow-listener-a_b.json"
