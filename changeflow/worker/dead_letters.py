"""Dead letters: task executions (or events) changeflow gave up on, kept in MongoDB for a replay.

One document per task id in `changeflow_dead_letters`; a repeated failure of the same task id
updates it (attempts, last_failed_at, error) instead of adding another. A replay is sending the
task again with the same task id after fixing the cause: the key was not marked done.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pymongo.database import Database

COLLECTION = "changeflow_dead_letters"
REASONS = frozenset({"permanent", "retries_exhausted", "unpublishable", "undecodable", "unorderable"})
TRACEBACK_LINES = 20

log = logging.getLogger(__name__)


def traceback_summary(traceback: str | None, lines: int = TRACEBACK_LINES) -> str | None:
    """The last `lines` lines of a formatted traceback: where it failed, without the whole stack."""
    if not traceback:
        return None
    return "\n".join(traceback.rstrip().splitlines()[-lines:])


def record_dead_letter(
    db: Database,
    *,
    task_name: str,
    task_id: str,
    payload: Mapping[str, Any],
    error: str,
    traceback: str | None,
    attempts: int,
    reason: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Store (or update) the dead letter of `task_id`, and log it at ERROR.

    reason: "permanent" (retrying cannot help), "retries_exhausted" (a transient error outlasted
    TASK_RETRY_FOR_SECONDS, or TASK_MAX_RETRIES when set), "unpublishable" (the listener could not
    serialize the event's payload), "undecodable" (the worker could not decode the task message; see
    `undecodable_payload`), "unorderable" (an ordered task's event has no value at its `ordered_by`
    path). `extra` adds fields (an ordered task's `ordering`: its key and the tasks that ran past
    it). Raises what MongoDB raises: the caller must keep the task.
    """
    if reason not in REASONS:
        raise ValueError(f"unknown dead-letter reason {reason!r}; expected one of {sorted(REASONS)}")
    now = datetime.now(UTC)
    db[COLLECTION].update_one(
        {"_id": task_id},
        {
            "$set": {
                "task": task_name,
                "task_id": task_id,
                "event_id": payload.get("_id"),
                "payload": dict(payload),
                "error": error,
                "reason": reason,
                "traceback": traceback_summary(traceback),
                "attempts": attempts,
                "last_failed_at": now,
                **(extra or {}),
            },
            "$setOnInsert": {"first_failed_at": now},
        },
        upsert=True,
    )
    log.error("dead letter %s %s (%s after %d attempt(s)): %s", task_name, task_id, reason, attempts, error)


def undecodable_payload(body: bytes | str) -> dict[str, Any]:
    """The payload of a task message the worker could not decode, read as far as it can be.

    The body is read as JSON with the registered types decoded where they decode and any other
    `__type__`/`__value__` object left as the plain dict it is; the task's first argument is the
    payload when it is a document. A body that is not JSON at all is kept as text under "body".
    The dead letter then says what the event was (its _id, ns, documentKey) for a replay with
    --refresh.
    """
    from kombu.utils.json import object_hook

    def lenient(value: dict[str, Any]) -> Any:
        try:
            return object_hook(value)
        except Exception:  # an unknown marker, or a value its decoder refuses: keep the dict
            return value

    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        decoded = json.loads(text, object_hook=lenient)
    except ValueError:
        return {"body": text}
    if isinstance(decoded, list) and decoded and isinstance(decoded[0], list) and decoded[0]:
        first = decoded[0][0]
        if isinstance(first, dict):
            return first
    return {"body": text}
