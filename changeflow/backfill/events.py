"""Backfill events and their task messages (pure).

A backfill event is shaped like an insert change event, so a task needs nothing new to run it:

    {_id: {_data: "backfill:<collection>:<_id as canonical Extended JSON>"},
     operationType: "insert", ns: {db, coll}, documentKey: {_id}, fullDocument: <the document>,
     wallTime: <when the backfill read it>, changeflow_backfill: {id: <backfill id>}}

The `_data` depends on the collection and the document's `_id` only, and the dedup key mixes in the
task name (changeflow.worker.keys.dedup_key): every backfill of task T over collection C gives a
document the same task id, so running it again (or resuming after a crash) runs nothing twice while
the done records last (DEDUP_TTL_SECONDS). No document version is part of it: the worker applies the
document as it is when the task runs (changeflow.worker.backfill), not the state read here.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from bson import json_util

from changeflow.listener.payload import task_payload
from changeflow.listener.publish import Message
from changeflow.worker.backfill import MARKER
from changeflow.worker.keys import dedup_key

TOKEN_PREFIX = "backfill:"


def id_text(value: Any) -> str:
    """`value` as canonical Extended JSON: one text per BSON value, types kept (1, 1.0, "1" differ)."""
    return json_util.dumps(value, json_options=json_util.CANONICAL_JSON_OPTIONS)


def backfill_token(collection: str, document_id: Any) -> dict[str, str]:
    """The synthetic resume token of a backfill event (never a live token: those hold hex only)."""
    return {"_data": f"{TOKEN_PREFIX}{collection}:{id_text(document_id)}"}


def backfill_event(
    db: str, collection: str, document: Mapping[str, Any], backfill_id: str, read_at: datetime
) -> dict[str, Any]:
    """The insert-shaped event for `document` of `db.collection` (see the module doc)."""
    return {
        "_id": backfill_token(collection, document["_id"]),
        "operationType": "insert",
        "ns": {"db": db, "coll": collection},
        "documentKey": {"_id": document["_id"]},
        "fullDocument": dict(document),
        "wallTime": read_at,
        MARKER: {"id": backfill_id},
    }


def backfill_message(event: Mapping[str, Any], task_name: str) -> Message:
    """The task message of a backfill event: the listener's payload plus the backfill marker."""
    payload = task_payload(event)
    payload[MARKER] = dict(event[MARKER])
    return Message(task_name, dedup_key(event["_id"], task_name), payload)
