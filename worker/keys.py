"""The dedup key: one stable id per (event, task), used as the Celery task id and the idempotency key."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

# Fixed forever: changing it changes every key, so events already processed would run again.
# (It is uuid5(NAMESPACE_DNS, "changeflow.dedup"), written out so nobody "fixes" the derivation.)
CHANGEFLOW_NAMESPACE = uuid.UUID("e91306e0-cb63-5d4e-9e08-d9bc87584537")


def dedup_key(resume_token: Mapping[str, Any], task_name: str) -> str:
    """str(uuid5(CHANGEFLOW_NAMESPACE, task_name + "\\n" + resume_token["_data"])).

    `resume_token` is the change event's `_id`. Its `_data` string is unique per event within a
    deployment, and the task name keeps one event's several tasks apart.
    """
    data = resume_token.get("_data") if isinstance(resume_token, Mapping) else None
    if not isinstance(data, str) or not data:
        raise ValueError(
            f"malformed resume token {resume_token!r}: expected a mapping with a non-empty '_data' string"
        )
    if not task_name:
        raise ValueError("task_name must not be empty")
    return str(uuid.uuid5(CHANGEFLOW_NAMESPACE, task_name + "\n" + data))
