"""Order analytics: per UTC day and status, how many orders entered that status.

A batched task (`batch=ANALYTICS_BATCH`, changeflow/worker/batches.py): it takes a list of events and
counts them in one transaction, whose counter increments go in one round trip (a bulk write of one
`$inc` per day and status). Counted once per event even when an event runs twice: each event's marker
`{_id: <its dedup key>}` in `order_analytics_applied` is written in the same transaction as the
increments, and an event whose marker exists is not counted again.

An event that counts for nothing (no status change) is a Skip of that event; one whose status is not
a string, or without a time, is reported failed (a permanent error: dead-lettered alone, the other
events of its batch are counted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from bson import Timestamp
from pymongo import UpdateOne
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from changeflow import FieldChanged
from changeflow.worker.batches import event_key
from changeflow.worker.errors import Skip
from changeflow.worker.mongo import get_db
from tasks.app import app

# Events per task: one transaction and one increment round trip for up to this many events.
ANALYTICS_BATCH = 100


class Bucket(NamedTuple):
    """One counter: orders that entered `status` on `day` (UTC, YYYY-MM-DD)."""

    day: str
    status: str

    @property
    def id(self) -> str:
        return f"{self.day}:{self.status}"


def event_time(event: Mapping[str, Any]) -> datetime:
    """When the write happened, in UTC: wallTime, else clusterTime."""
    wall = event.get("wallTime")
    if isinstance(wall, datetime):
        # pymongo returns naive UTC datetimes unless tz_aware; treat naive as UTC.
        return wall.replace(tzinfo=UTC) if wall.tzinfo is None else wall.astimezone(UTC)
    cluster = event.get("clusterTime")
    if isinstance(cluster, Timestamp):
        return cluster.as_datetime().astimezone(UTC)
    raise ValueError(f"event {event.get('_id')!r} has neither wallTime nor clusterTime")


def counted_status(event: Mapping[str, Any]) -> str | None:
    """The status an orders event counts for: an insert's initial status, an update's new status.

    ValueError for a status that is neither a string nor null (bad data: counted nowhere).
    """
    operation = event.get("operationType")
    if operation == "insert":
        status = (event.get("fullDocument") or {}).get("status")
    elif operation == "update":
        status = ((event.get("updateDescription") or {}).get("updatedFields") or {}).get("status")
    else:
        return None
    if status is not None and not isinstance(status, str):
        raise ValueError(f"order status must be a string, got {type(status).__name__} {status!r}")
    return status or None


def analytics_bucket(event: Mapping[str, Any]) -> Bucket | None:
    """The counter this event increments, or None when it counts for nothing."""
    status = counted_status(event)
    if status is None:
        return None
    return Bucket(event_time(event).strftime("%Y-%m-%d"), status)


class Count(NamedTuple):
    """One event to count: its dedup key, its counter, and its order's _id (kept on its marker)."""

    key: str
    bucket: Bucket
    order_id: Any = None


def count_once(db: Database, key: str, bucket: Bucket) -> bool:
    """Increment `bucket` for the event of `key` unless it was counted; True when this call counted."""
    return key in count_batch(db, [Count(key, bucket)])


def count_batch(db: Database, counts: Sequence[Count]) -> set[str]:
    """Count each event whose key was not counted before, in one transaction; the keys counted.

    In the transaction: the markers that exist already (one find), the new markers (one insert_many),
    the increments (one bulk write, one `$inc` per bucket). A marker written meanwhile by another
    transaction aborts this one (a write conflict or duplicate key), which then runs again and finds it.
    """
    wanted = {count.key: count for count in counts}  # one key twice in a list counts once
    if not wanted:
        return set()
    counted: set[str] = set()

    def apply(session: ClientSession) -> None:
        counted.clear()
        seen = {
            marker["_id"]
            for marker in db.order_analytics_applied.find(
                {"_id": {"$in": list(wanted)}}, {"_id": 1}, session=session
            )
        }
        new = {key: count for key, count in wanted.items() if key not in seen}
        if not new:
            return
        now = datetime.now(UTC)
        db.order_analytics_applied.insert_many(
            [
                {"_id": key, "bucket": count.bucket.id, "order_id": count.order_id, "applied_at": now}
                for key, count in new.items()
            ],
            session=session,
        )
        increments = Counter(count.bucket for count in new.values())
        db.order_analytics.bulk_write(
            [
                UpdateOne(
                    {"_id": bucket.id},
                    {"$inc": {"count": n}, "$setOnInsert": {"day": bucket.day, "status": bucket.status}},
                    upsert=True,
                )
                for bucket, n in increments.items()
            ],
            ordered=False,
            session=session,
        )
        counted.update(new)

    for _ in range(_DUPLICATE_ATTEMPTS):
        with db.client.start_session() as session:
            try:
                session.with_transaction(apply)
            except DuplicateKeyError:
                continue  # another run wrote a marker between our find and insert: look again
        return set(counted)
    raise DuplicateKeyError("markers kept appearing between the find and the insert")


# A duplicate marker only appears when another run of the same event raced this one.
_DUPLICATE_ATTEMPTS = 3


@app.on("orders", "update", when=FieldChanged("status"))
@app.on("orders", "insert", name="tasks.update_analytics", batch=ANALYTICS_BATCH)
def update_analytics(events: list[dict[str, Any]]) -> dict[int, BaseException] | None:
    """Count orders inserts and status changes in their day's per-status counters (a batch of events).

    Returns the events that fail by position (changeflow/worker/batches.py): a Skip for an event that
    counts for nothing, the ValueError of bad data; the others are counted.
    """
    failures: dict[int, BaseException] = {}
    counts: list[Count] = []
    for position, event in enumerate(events):
        try:
            bucket = analytics_bucket(event)
        except ValueError as exc:
            failures[position] = exc
            continue
        if bucket is None:
            failures[position] = Skip("the event changes no order status")
        else:
            counts.append(Count(event_key(event), bucket, (event.get("documentKey") or {}).get("_id")))
    count_batch(get_db(), counts)
    return failures or None
