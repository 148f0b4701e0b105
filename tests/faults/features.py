"""Which listener features the scenarios need are there (scenarios 5 and 6 need work in progress).

A scenario whose feature is missing still runs; pytest marks it xfail(strict=True) naming the
missing feature, so it turns into a plain test the day the feature lands, without an edit here.
"""

from __future__ import annotations

import subprocess
import sys
from functools import cache

from harness.processes import REPO_ROOT


@cache
def listener_help() -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "listener", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return completed.stdout + completed.stderr


def _module_exists(name: str) -> bool:
    return (REPO_ROOT / "changeflow" / "listener" / f"{name}.py").exists()


def missing_feature(number: int) -> str | None:
    """Why scenario `number` cannot pass yet, or None when what it needs is there."""
    if number == 5 and "--on-history-lost" not in listener_help():
        return (
            "history-lost handling: `python -m listener --on-history-lost=fail|resume-now` "
            "(exit code EXIT_HISTORY_LOST plus a record in changeflow_gaps) is not in the listener CLI"
        )
    if number == 6:
        stream = (REPO_ROOT / "changeflow" / "listener" / "stream.py").read_text()
        if not _module_exists("lease") or "standby" not in stream:
            return (
                "listener failover: a lease with a fencing token (standby listeners) is not in the listener"
            )
    return None
