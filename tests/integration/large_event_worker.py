"""changeflow's worker app recording what each task received: `celery -A <this module> worker`.

The app is this repository's own (`worker.app`, tasks/app.py), same settings and tasks;
before each task body runs, a summary
of its event (sizes and digests of the large fields, not the fields) is inserted into
`large_event_seen`, so a test can see the event a task ran with, as the worker decoded it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any

from celery import Task
from celery.signals import worker_init

from worker import app  # this repository's app, its modules discovered
from worker.mongo import get_db

SEEN = "large_event_seen"


def digest(value: Any) -> dict[str, Any]:
    text = value if isinstance(value, str) else repr(value)
    return {"length": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def summary(task: Task, event: Mapping[str, Any]) -> dict[str, Any]:
    full = event.get("fullDocument") or {}
    updated = (event.get("updateDescription") or {}).get("updatedFields") or {}
    return {
        "task": task.name,
        "task_id": task.request.id,
        "event_id": event.get("_id"),
        "operationType": event.get("operationType"),
        "fields": sorted(event),
        "fullDocument": {k: digest(v) if isinstance(v, str) and len(v) > 64 else v for k, v in full.items()},
        "updatedFields": {
            k: digest(v) if isinstance(v, str) and len(v) > 64 else v for k, v in updated.items()
        },
    }


def _recording(task: Task) -> None:
    body: Callable[..., Any] = task.run

    @wraps(body)
    def run(event: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        get_db()[SEEN].insert_one(summary(task, event))
        return body(event, *args, **kwargs)

    task.run = run  # IdempotentTask calls self.run: the instance attribute shadows the class's body


@worker_init.connect
def _record_in_workers(**_: Any) -> None:
    # In the worker only (before its pool forks): a test importing SEEN or digest from here must
    # not find the repository's tasks wrapped in its own process.
    for name, task in app.tasks.items():
        if name.startswith("tasks."):
            _recording(task)

__all__ = ["app"]
