"""The pure parts of backfills: events and task ids, `_id` paging, the token bucket, progress text."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import mongomock
import pytest
from bson import Int64, MaxKey, MinKey, ObjectId, Timestamp

from changeflow.backfill.cli import UsageError, filter_text, parse_filter, shown_state
from changeflow.backfill.events import backfill_event, backfill_message, backfill_token
from changeflow.backfill.position import page_query
from changeflow.backfill.progress import (
    Progress,
    ProgressPrinter,
    bar_line,
    eta_seconds,
    format_duration,
    log_line,
)
from changeflow.backfill.rate import TokenBucket, slice_size, slices
from changeflow.worker.backfill import MARKER, backfill_marker, fresh_args
from changeflow.worker.keys import dedup_key

READ_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


# -- events ----------------------------------------------------------------------------------------


def test_a_backfill_event_is_insert_shaped_and_marked() -> None:
    user = {"_id": ObjectId("65a000000000000000000001"), "name": "Ada"}
    event = backfill_event("app", "users", user, "bf1", READ_AT)
    assert event["operationType"] == "insert"
    assert event["ns"] == {"db": "app", "coll": "users"}
    assert event["documentKey"] == {"_id": user["_id"]}
    assert event["fullDocument"] == user
    assert event["wallTime"] == READ_AT
    assert event[MARKER] == {"id": "bf1"}
    assert event["_id"] == {"_data": 'backfill:users:{"$oid": "65a000000000000000000001"}'}


def test_the_message_carries_the_marker_and_a_key_from_collection_task_and_id_only() -> None:
    user = {"_id": 7, "name": "Ada"}
    first = backfill_message(backfill_event("app", "users", user, "bf1", READ_AT), "tasks.create_profile")
    # Another backfill, later, of a changed document: the same task id (the guard runs it once).
    changed = {"_id": 7, "name": "Ada L."}
    again = backfill_message(
        backfill_event("app", "users", changed, "bf2", datetime.now(UTC)), "tasks.create_profile"
    )
    assert first.task_id == again.task_id == dedup_key(backfill_token("users", 7), "tasks.create_profile")
    assert first.payload[MARKER] == {"id": "bf1"} and first.payload["fullDocument"] == user
    other_task = backfill_message(backfill_event("app", "users", user, "bf1", READ_AT), "tasks.other")
    other_coll = backfill_message(
        backfill_event("app", "people", user, "bf1", READ_AT), "tasks.create_profile"
    )
    assert len({first.task_id, other_task.task_id, other_coll.task_id}) == 3


def test_ids_of_different_types_get_different_keys() -> None:
    tokens = {backfill_token("c", value)["_data"] for value in (1, Int64(1), 1.5, "1", ObjectId("0" * 24))}
    assert len(tokens) == 5


def test_a_live_event_is_not_a_backfill_event() -> None:
    live = {"_id": {"_data": "8263"}, "operationType": "insert", "fullDocument": {"_id": 1}}
    assert backfill_marker(live) is None
    assert fresh_args((live,)) == (live,)  # untouched, no database read
    assert backfill_marker({MARKER: {"id": "x"}}) == {"id": "x"}


# -- position --------------------------------------------------------------------------------------


def walk(collection: mongomock.Collection, query: dict, batch: int) -> list:
    seen, last, started = [], None, False
    while True:
        docs = list(collection.find(page_query(query, last, started=started)).sort("_id", 1).limit(batch))
        if not docs:
            return seen
        seen.extend(d["_id"] for d in docs)
        last, started = docs[-1]["_id"], True


def test_paging_walks_every_id_once_in_order_across_types() -> None:
    collection = mongomock.MongoClient().db.c
    # mongomock cannot sort MinKey/MaxKey and takes True for a duplicate of 1: those are left out.
    ids = [None, -3, 1, 2.5, Int64(4), "a", "b", {"k": 1}, b"\x01", ObjectId(), datetime(2020, 1, 1)]
    collection.insert_many([{"_id": value, "even": i % 2 == 0} for i, value in enumerate(ids)])
    expected = [d["_id"] for d in collection.find().sort("_id", 1)]
    for batch in (1, 2, 5, 100):
        assert walk(collection, {}, batch) == expected
    evens = [d["_id"] for d in collection.find({"even": True}).sort("_id", 1)]
    assert walk(collection, {"even": True}, 3) == evens and len(evens) == 6


def test_the_first_batch_uses_the_filter_alone_and_later_ones_a_range_not_skip() -> None:
    assert page_query({"plan": "pro"}, None, started=False) == {"plan": "pro"}
    later = page_query({"plan": "pro"}, 5, started=True)
    assert later["$and"][0] == {"plan": "pro"}
    assert later["$and"][1]["$or"][0] == {"_id": {"$gt": 5}}
    # A null _id is a position too (started tells it from "nothing yet").
    assert page_query({}, None, started=True)["$or"][0] == {"_id": {"$gt": None}}
    # After MinKey every other type follows, in MongoDB's order; after MaxKey nothing does.
    after_min = page_query({}, MinKey(), started=True)["$or"]
    assert after_min[1] == {"_id": None} and after_min[-1] == {"_id": MaxKey()} and len(after_min) == 10
    assert page_query({}, MaxKey(), started=True) == {"$or": [{"_id": {"$gt": MaxKey()}}]}
    assert page_query({}, True, started=True)["$or"][1:] == [{"_id": {"$type": "date"}}, {"_id": MaxKey()}]


def test_an_id_type_that_cannot_be_paged_is_refused() -> None:
    with pytest.raises(ValueError, match="Timestamp"):
        page_query({}, Timestamp(1, 1), started=True)


# -- rate --------------------------------------------------------------------------------------------


def test_token_bucket_paces_to_the_rate_without_sleeping() -> None:
    bucket = TokenBucket(100.0, now=0.0)  # capacity 10 (a tenth of a second)
    assert bucket.reserve(10, now=0.0) == 0.0
    assert bucket.reserve(10, now=0.0) == pytest.approx(0.1)  # in debt: wait for 10 tokens
    # After the wait the debt is paid; 50 more take half a second.
    assert bucket.reserve(50, now=0.1) == pytest.approx(0.5)
    # Idle time refills up to the capacity only: no burst bigger than it.
    assert bucket.reserve(10, now=100.0) == 0.0
    assert bucket.reserve(1, now=100.0) == pytest.approx(0.01)


def test_token_bucket_average_rate_holds_for_any_sizes() -> None:
    bucket, now = TokenBucket(40.0, now=0.0), 0.0
    for size in [1, 7, 30, 2, 100, 13] * 5:
        now += bucket.reserve(size, now)
    total = sum([1, 7, 30, 2, 100, 13] * 5)
    assert (total - bucket.capacity) / 40.0 == pytest.approx(now)


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0.0, now=0.0)


def test_slices() -> None:
    assert slice_size(500, None) == 500
    assert slice_size(500, 1000.0) == 100
    assert slice_size(500, 3.0) == 1
    assert slice_size(20, 1e6) == 20
    assert [list(s) for s in slices([1, 2, 3, 4, 5], 2)] == [[1, 2], [3, 4], [5]]


# -- progress --------------------------------------------------------------------------------------


def test_durations_and_eta() -> None:
    assert [format_duration(s) for s in (0, 45.4, 185, 7620)] == ["0s", "45s", "3m05s", "2h07m"]
    assert eta_seconds(2500, 5000, 500.0) == 5.0
    assert eta_seconds(0, 5000, 0.0) is None
    assert eta_seconds(5000, 5000, 0.0) == 0.0


def test_bar_and_log_lines() -> None:
    assert bar_line(2500, 5000, 830.2, 3.0, width=10) == "[#####-----] 2,500/5,000  50%  830 ev/s  ETA 3s"
    assert bar_line(0, 0, 0.0, None, width=4) == "[####] 0/0 100%  0 ev/s  ETA --"
    assert (
        bar_line(12, 10, 1.0, 0.0, width=4) == "[####] 12/12 100%  1 ev/s  ETA 0s"
    )  # more found than counted
    assert (
        log_line("bf1", 250, 1000, 99.6, 8.0) == "backfill bf1: 250/1000 events (25%), 100 events/s, ETA 8s"
    )
    assert log_line("bf1", 0, 1000, 0.0, None).endswith("0 events/s, ETA unknown")


def test_progress_rate_over_a_recent_window() -> None:
    progress = Progress(total=1000)
    progress.start(0.0)
    for second in range(1, 21):
        progress.advance(10 if second <= 10 else 40, float(second))
    # The last 10 s ran at 40/s: the rate says so, not the overall average (25/s).
    assert progress.rate(20.0) == pytest.approx(40.0, rel=0.1)
    assert progress.done == 500
    assert progress.eta(20.0) == pytest.approx(500 / progress.rate(20.0))


def test_printer_draws_a_bar_on_a_terminal_and_lines_in_a_pipe() -> None:
    progress = Progress(total=100)
    progress.start(0.0)
    progress.advance(50, 1.0)
    tty = io.StringIO()
    printer = ProgressPrinter("bf1", stream=tty, tty=True)
    printer.show(progress, 1.0)
    printer.show(progress, 1.05)  # too soon: not redrawn
    printer.message("note")
    printer.show(progress, 2.0, final=True)
    text = tty.getvalue()
    assert text.count("\r[") == 2 and text.endswith("\n") and "\nnote\n" in text
    pipe = io.StringIO()
    lines = ProgressPrinter("bf1", stream=pipe, tty=False)
    lines.show(progress, 1.0)
    lines.show(progress, 2.0)  # within the log interval: nothing
    lines.show(progress, 2.5, final=True)
    assert pipe.getvalue().splitlines() == [
        "backfill bf1: 50/100 events (50%), 50 events/s, ETA 1s",
        "backfill bf1: 50/100 events (50%), 20 events/s, ETA 2s",
    ]
    assert "\r" not in pipe.getvalue()


# -- the command's pure parts ----------------------------------------------------------------------


def test_filter_is_extended_json_and_shown_canonical() -> None:
    query = parse_filter('{"_id": {"$gt": {"$oid": "65a000000000000000000001"}}, "n": {"$numberLong": "5"}}')
    assert query == {"_id": {"$gt": ObjectId("65a000000000000000000001")}, "n": Int64(5)}
    assert parse_filter(filter_text(query)) == query
    assert parse_filter(None) == {}
    with pytest.raises(UsageError, match="JSON object"):
        parse_filter("[1]")
    with pytest.raises(UsageError, match="not valid"):
        parse_filter("{plan: pro}")


def test_a_running_record_whose_process_is_gone_shows_as_interrupted() -> None:
    assert shown_state({"state": "running"}, owner_gone=True) == "interrupted"
    assert shown_state({"state": "running"}, owner_gone=False) == "running"
    assert shown_state({"state": "done"}, owner_gone=True) == "done"
