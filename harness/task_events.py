"""Reading Celery task events from Redis pub/sub, as Flower's receiver gets them (benchmarks, tests)."""

from __future__ import annotations

import base64
import json
from typing import Any

# Every task event topic of kombu's Redis fanout ("/<db>.celeryev/task.<type>", and task.multi).
TASK_EVENTS_PATTERN = "*celeryev/task.*"


def task_events(data: bytes) -> list[dict[str, Any]]:
    """The events of one pub/sub message: a list body is a group (task.multi), anything else one event."""
    body = json.loads(base64.b64decode(json.loads(data)["body"]))
    return body if isinstance(body, list) else [body]
