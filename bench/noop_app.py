"""This repository's app (worker.app) plus a no-op task, `tasks.noop`, behind the same dedup guard:
for the worker benchmark.

`celery -A bench.noop_app worker` runs changeflow's worker (same configuration, same guard) with this
extra task, so the benchmark measures the worker and the guard, not a side effect.
"""

from __future__ import annotations

from typing import Any

from changeflow.worker.idempotent import IdempotentTask
from worker import app

__all__ = ["app", "noop"]


@app.task(name="tasks.noop", base=IdempotentTask)  # no route: the benchmark sends it by name
def noop(event: dict[str, Any]) -> None:
    """Nothing: what is left is Celery's and the dedup guard's cost per task."""
