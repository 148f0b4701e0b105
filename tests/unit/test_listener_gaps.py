"""Which delivered inserts the listener notes in a resumed gap (late_inserts, pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId

from changeflow.listener.gaps import LATE_WRITE_SECONDS, GapEnd, creation_times, in_window, late_inserts

SINCE = datetime(2026, 12, 4, 12, 0, 0, 500_000, tzinfo=UTC)
UNTIL = datetime(2026, 12, 4, 12, 5, 0, 250_000, tzinfo=UTC)
END = GapEnd("gap-1", SINCE, UNTIL)
INSERTS = {"users": [], "orders": ["created_at"]}


def insert(coll: str, _id: Any, **fields: Any) -> dict[str, Any]:
    return {
        "operationType": "insert",
        "ns": {"db": "app", "coll": coll},
        "documentKey": {"_id": _id},
        "fullDocument": {"_id": _id, **fields},
    }


def test_the_window_holds_its_first_and_last_seconds_entirely() -> None:
    assert in_window(SINCE.replace(microsecond=0), SINCE, UNTIL)
    assert in_window(UNTIL.replace(microsecond=999_999), SINCE, UNTIL)
    assert not in_window(SINCE.replace(microsecond=0) - timedelta(microseconds=1), SINCE, UNTIL)
    assert not in_window(UNTIL.replace(microsecond=0) + timedelta(seconds=1), SINCE, UNTIL)


def test_creation_times_come_from_the_objectid_and_the_changed_at_fields() -> None:
    oid = ObjectId.from_datetime(UNTIL)
    naive = datetime(2026, 12, 4, 12, 1)
    assert creation_times({"_id": oid, "created_at": naive, "other": naive}, ["created_at"]) == [
        UNTIL.replace(microsecond=0),
        naive.replace(tzinfo=UTC),
    ]
    assert creation_times({"_id": 7, "created_at": "not a date"}, ["created_at"]) == []


def test_only_inserts_created_inside_a_window_on_insert_routed_collections_are_noted() -> None:
    inside, outside = ObjectId.from_datetime(UNTIL), ObjectId.from_datetime(UNTIL + timedelta(seconds=1))
    events = [
        insert("users", inside),
        insert("users", outside),
        insert("audit", ObjectId.from_datetime(UNTIL)),  # no insert route
        {**insert("users", inside), "operationType": "update"},
        insert("orders", 42, created_at=(UNTIL - timedelta(seconds=30)).replace(tzinfo=None)),
        insert("orders", 43, created_at=UNTIL + timedelta(seconds=2)),
        # Inside the window but long before its end: not a write in flight at the resume.
        insert("users", ObjectId.from_datetime(UNTIL - timedelta(seconds=LATE_WRITE_SECONDS + 1))),
    ]
    assert late_inserts(events, [END], INSERTS) == {
        "gap-1": [{"coll": "users", "id": inside}, {"coll": "orders", "id": 42}]
    }
    assert late_inserts(events, [], INSERTS) == {}
    short = GapEnd("gap-3", UNTIL - timedelta(seconds=5), UNTIL)  # a window shorter than a minute
    assert (
        late_inserts(
            [insert("users", ObjectId.from_datetime(UNTIL - timedelta(seconds=6)))], [short], INSERTS
        )
        == {}
    )


def test_an_insert_inside_two_windows_is_noted_in_both() -> None:
    other = GapEnd("gap-2", SINCE - timedelta(hours=1), UNTIL)
    oid = ObjectId.from_datetime(UNTIL - timedelta(seconds=10))
    assert late_inserts([insert("users", oid)], [END, other], INSERTS) == {
        "gap-1": [{"coll": "users", "id": oid}],
        "gap-2": [{"coll": "users", "id": oid}],
    }
