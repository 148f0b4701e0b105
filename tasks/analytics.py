"""Order analytics: per UTC day and status, how many orders entered that status.

Counted once per event even when the task runs twice: the counter's `$inc` and a marker
`{_id: <dedup key>}` in `order_analytics_applied` are written in one transaction, and a marker
that already exists means the event was counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from bson import Timestamp
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from changeflow import FieldChanged
from changeflow.worker.errors import Skip
from changeflow.worker.idempotent import current_key
from changeflow.worker.mongo import get_db
from tasks.app import app


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
    """The status an orders event counts for: an insert's initial status, an update's new status."""
    operation = event.get("operationType")
    if operation == "insert":
        status = (event.get("fullDocument") or {}).get("status")
    elif operation == "update":
        status = ((event.get("updateDescription") or {}).get("updatedFields") or {}).get("status")
    else:
        return None
    return status if isinstance(status, str) and status else None


def analytics_bucket(event: Mapping[str, Any]) -> Bucket | None:
    """The counter this event increments, or None when it counts for nothing."""
    status = counted_status(event)
    if status is None:
        return None
    return Bucket(event_time(event).strftime("%Y-%m-%d"), status)


class _AlreadyCounted(Exception):
    """Raised inside the transaction to abort it when the marker exists."""


def count_once(db: Database, key: str, bucket: Bucket) -> bool:
    """Increment `bucket` for the event of `key` unless it was counted; True when this call counted."""

    def apply(session: ClientSession) -> None:
        try:
            db.order_analytics_applied.insert_one(
                {"_id": key, "bucket": bucket.id, "applied_at": datetime.now(UTC)}, session=session
            )
        except DuplicateKeyError:
            # Raising aborts the transaction (a failed write already doomed it on a real server).
            raise _AlreadyCounted from None
        db.order_analytics.update_one(
            {"_id": bucket.id},
            {"$inc": {"count": 1}, "$setOnInsert": {"day": bucket.day, "status": bucket.status}},
            upsert=True,
            session=session,
        )

    with db.client.start_session() as session:
        try:
            session.with_transaction(apply)
        except _AlreadyCounted:
            return False
    return True


@app.on("orders", "update", when=FieldChanged("status"))
@app.on("orders", "insert", name="tasks.update_analytics")
def update_analytics(event: dict[str, Any]) -> None:
    """Count an orders insert or status change in its day's per-status counter."""
    bucket = analytics_bucket(event)
    if bucket is None:
        raise Skip("the event changes no order status")
    count_once(get_db(), current_key(), bucket)
