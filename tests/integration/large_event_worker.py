"""changeflow's worker app recording what each task received: `celery -A <this module> worker`.

The app is this repository's own (`worker.app`, tasks/app.py), same settings and tasks; before each
task body runs, a summary of its event (sizes and digests of the large fields, not the fields) is
inserted into `large_event_seen` (one per event of a batched task), so a test can see the event a
task ran with, as the worker decoded it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from celery import Task

from changeflow.worker.mongo import get_db
from tests.integration.large_event_summary import SEEN, summary
from worker import app  # this repository's app, its modules discovered


def _recording(task: Task) -> None:
    body: Callable[..., Any] = task.run

    @wraps(body)
    def run(event: dict[str, Any] | list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
        # A batched task (`batch=`) receives a list of events: one record per event.
        events = event if isinstance(event, list) else [event]
        get_db()[SEEN].insert_many([summary(task, one) for one in events])
        return body(event, *args, **kwargs)

    task.run = run  # IdempotentTask calls self.run: the instance attribute shadows the class's body


for _name, _task in app.tasks.items():
    if _name.startswith("tasks."):
        _recording(_task)

__all__ = ["app"]
