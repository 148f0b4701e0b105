"""reconcile's choice of documents and the synthetic events' shape (mongomock, a recording publisher)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import mongomock
from bson import ObjectId

from changeflow.listener.publish import Message, Rejected
from changeflow.listener.reconcile import build_parser, reconcile, synthetic_events
from changeflow.listener.routes import FieldChanged, Route
from changeflow.worker.keys import dedup_key

START = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
END = START + timedelta(minutes=10)
ROUTES = (
    Route("users", ["insert"], ["tasks.send_welcome_email", "tasks.create_profile"]),
    Route("orders", ["insert"], ["tasks.update_analytics"], changed_at="created_at"),
    Route(
        "orders",
        ["update"],
        ["tasks.send_shipping_notification"],
        when=FieldChanged("status"),
        changed_at="status_changed_at",
    ),
)


class Recorder:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    def publish(self, messages: Sequence[Message]) -> list[Rejected]:
        self.messages.extend(messages)
        return []


def oid(at: datetime) -> ObjectId:
    return ObjectId.from_datetime(at)


def test_documents_written_in_the_window_become_synthetic_events() -> None:
    db = mongomock.MongoClient().app
    inside = oid(START + timedelta(minutes=1))
    db.users.insert_many(
        [{"_id": oid(START - timedelta(seconds=5)), "email": "before"}, {"_id": inside, "email": "inside"}]
    )
    db.users.insert_one({"_id": oid(END + timedelta(seconds=5)), "email": "after"})
    db.users.insert_one({"_id": "text-id", "email": "no time"})  # no ObjectId, no changed_at: not found
    db.orders.insert_one({"_id": 1, "status": "new", "created_at": START + timedelta(minutes=2)})
    db.orders.insert_one(
        {"_id": 2, "status": "shipped", "created_at": START - timedelta(days=1),
         "status_changed_at": START + timedelta(minutes=3)}
    )  # fmt: skip
    events = [s.event for s in synthetic_events(db, ROUTES, START, END)]
    assert [(e["ns"]["coll"], e["operationType"], e["documentKey"]["_id"]) for e in events] == [
        ("users", "insert", inside),
        ("orders", "insert", 1),
        ("orders", "update", 2),
    ]
    user = events[0]
    assert user["_id"] == {"_data": f"reconcile:users:{inside}"}
    assert user["fullDocument"] == {"_id": inside, "email": "inside"}
    assert user["wallTime"] == inside.generation_time
    assert events[2]["updateDescription"]["updatedFields"] == {"status": "shipped"}
    assert events[2]["_id"]["_data"].startswith("reconcile:orders:2:update:")


def test_the_same_window_publishes_the_same_task_ids_and_dry_run_publishes_nothing() -> None:
    db = mongomock.MongoClient().app
    inside = oid(START + timedelta(seconds=30))
    db.users.insert_one({"_id": inside, "email": "inside"})
    dry = Recorder()
    counts = reconcile(db, dry, ROUTES, START, END, dry_run=True, out=io.StringIO())
    assert dry.messages == [] and counts == {"events": 1, "tasks": 2, "dead_letters": 0}
    runs = []
    for _ in range(2):
        recorder = Recorder()
        reconcile(db, recorder, ROUTES, START, END, out=io.StringIO())
        runs.append([m.task_id for m in recorder.messages])
    token = {"_data": f"reconcile:users:{inside}"}
    assert (
        runs[0]
        == runs[1]
        == [dedup_key(token, "tasks.send_welcome_email"), dedup_key(token, "tasks.create_profile")]
    )


def test_window_flags_are_utc_unless_they_name_a_zone() -> None:
    parsed = build_parser().parse_args(
        ["--since", "2026-11-23T13:00:00", "--until", "2026-11-23T14:30:00+01:00"]
    )
    assert parsed.since == datetime(2026, 11, 23, 13, 0, tzinfo=UTC)
    assert parsed.until == datetime(
        2026, 11, 23, 13, 30, tzinfo=UTC
    ) and parsed.until.utcoffset() == timedelta(hours=1)
