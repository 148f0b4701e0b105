"""The event store: every change to `users` and `orders`, one entry per change event, in `event_store`.

    {_id: eventId, eventId, eventType, aggregateType, aggregateId, eventData, timestamp}

- `eventId`: the change event's resume token (`_id._data`, hex), the id the dedup guard's key comes
  from; it is also the entry's `_id`, so a redelivery cannot store a change twice.
- `eventType`: the change's operationType (insert, update, replace, delete).
- `aggregateType`, `aggregateId`: the collection and the document's `_id` as stored (an ObjectId
  stays an ObjectId).
- `eventData`: the new document for an insert or replace, the updateDescription for an update
  (updatedFields, removedFields, truncatedArrays: the change itself, not the document after it),
  absent for a delete.
- `timestamp`: the change's clusterTime, a BSON Timestamp (the commit's position in the oplog).
  An insert re-emitted by `python -m listener reconcile` (lost history) has none: its entry has
  `timestamp` null and `reconciled: true` (null sorts first, as an aggregate's insert does).

An aggregate's history in commit order: `find({aggregateId: X}).sort([("timestamp", 1), ("eventId", 1)])`,
served by the index {aggregateId: 1, timestamp: 1, eventId: 1}. The changes of one transaction share
one clusterTime; their resume tokens (eventId) sort in the order the transaction made them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bson import Timestamp
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from changeflow.worker.errors import PermanentTaskError
from changeflow.worker.mongo import get_db
from tasks.app import app
from tasks.indexes import ensure_index

COLLECTION = "event_store"
OPERATIONS = ("insert", "update", "replace", "delete")
RECONCILED_PREFIX = "reconcile:"  # the ids of events `python -m listener reconcile` makes
# The order an aggregate's events are read in (see the module docstring).
HISTORY_ORDER: list[tuple[str, int]] = [("aggregateId", 1), ("timestamp", 1), ("eventId", 1)]


def event_id(event: Mapping[str, Any]) -> str:
    """The change event's id: its resume token's hex (`_id._data`)."""
    token = event.get("_id")
    data = token.get("_data") if isinstance(token, Mapping) else None
    if not isinstance(data, str) or not data:
        raise PermanentTaskError(f"change event without a resume token: _id {token!r}")
    return data


def store_entry(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event_store entry of one change event (PermanentTaskError when it cannot have one)."""
    operation = event.get("operationType")
    if operation not in OPERATIONS:
        raise PermanentTaskError(f"no event_store entry for operationType {operation!r}")
    cluster_time = event.get("clusterTime")
    identifier = event_id(event)
    reconciled = identifier.startswith(RECONCILED_PREFIX)
    if not isinstance(cluster_time, Timestamp) and not reconciled:
        raise PermanentTaskError(f"change event without a clusterTime Timestamp: {cluster_time!r}")
    entry: dict[str, Any] = {
        "_id": identifier,
        "eventId": identifier,
        "eventType": operation,
        "aggregateType": (event.get("ns") or {}).get("coll"),
        "aggregateId": event["documentKey"]["_id"],
        "timestamp": cluster_time if isinstance(cluster_time, Timestamp) else None,
    }
    if reconciled:
        entry["reconciled"] = True
    if operation in ("insert", "replace"):
        entry["eventData"] = event.get("fullDocument")
    elif operation == "update":
        entry["eventData"] = event.get("updateDescription")
    return entry


def append_once(db: Database, entry: Mapping[str, Any]) -> bool:
    """Insert `entry` unless an entry with its eventId exists; True when this call inserted it."""
    ensure_index(db, COLLECTION, HISTORY_ORDER)
    try:
        db[COLLECTION].insert_one(dict(entry))
    except DuplicateKeyError:
        return False  # stored by an earlier delivery
    return True


@app.on("orders", OPERATIONS)
@app.on("users", OPERATIONS, name="tasks.append_event")
def append_event(event: dict[str, Any]) -> None:
    """Append the change to the event store."""
    append_once(get_db(), store_entry(event))
