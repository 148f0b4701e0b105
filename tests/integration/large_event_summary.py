"""What the large-event test records of each task's event: sizes and digests of the large fields.

Kept apart from large_event_worker, which patches the app's tasks when imported: the test process
imports only this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from celery import Task

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

