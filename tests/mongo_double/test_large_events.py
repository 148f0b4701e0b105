"""Change events over 16 MB and the document size limit, with MongoDB 7.0 semantics.

A change event larger than mongod can serialize fails the change stream with BSONObjectTooLarge
(10334); with `$changeStreamSplitLargeEvent` as the last stage, such an event arrives as fragments
(`splitEvent: {fragment, of}`), each with its own resume token. These tests run unchanged against a
real MongoDB 7.0 replica set when MONGODB_URI is set.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import bson
import pymongo
import pytest
from pymongo.change_stream import ChangeStream
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import OperationFailure, WriteError

from tests.mongo_double.helpers import next_event
from tests.mongo_double.test_conformance import _op_msg, _raw_roundtrip

MB = 1024 * 1024
MAX_USER_SIZE = 16 * MB
MAX_INTERNAL_SIZE = MAX_USER_SIZE + 16 * 1024  # mongod's BSONObjMaxInternalSize
SPLIT: list[dict[str, Any]] = [{"$changeStreamSplitLargeEvent": {}}]
AWAIT_MS = 200
EVENT_FIELDS = {"operationType", "clusterTime", "wallTime", "ns", "documentKey", "updateDescription"}


def watch(coll: Collection, pipeline: list[dict[str, Any]] | None = None, **kwargs: Any) -> ChangeStream:
    kwargs.setdefault("max_await_time_ms", AWAIT_MS)
    return coll.watch(pipeline or [], full_document="updateLookup", **kwargs)


def large_update(coll: Collection) -> dict[str, Any]:
    """A 10 MB document, then an update adding 5 MB: post-image 15 MB + updateDescription 5 MB."""
    coll.insert_one({"_id": 1, "status": "new", "big": "a" * (10 * MB)})
    coll.update_one({"_id": 1}, {"$set": {"status": "shipped", "more": "b" * (5 * MB)}})
    return {"_id": 1, "status": "shipped", "big": "a" * (10 * MB), "more": "b" * (5 * MB)}


def fragments(stream: ChangeStream) -> list[dict[str, Any]]:
    """The fragments of large_update's update event (its insert event, 10 MB, is not split)."""
    first = next_event(stream, timeout=30)
    if first["operationType"] == "insert" and "splitEvent" not in first:
        first = next_event(stream, timeout=30)
    assert "splitEvent" in first, "the large event was not split"
    rest = [next_event(stream, timeout=30) for _ in range(first["splitEvent"]["of"] - 1)]
    return [first, *rest]


def test_an_event_over_16mb_fails_the_stream_without_the_split_stage(db: Database) -> None:
    db.orders.insert_one({"_id": 1, "big": "a" * (10 * MB)})
    with watch(db.orders) as stream:
        db.orders.update_one({"_id": 1}, {"$set": {"more": "b" * (5 * MB)}})  # event: 15 MB + 5 MB
        with pytest.raises(OperationFailure) as info:
            next_event(stream, timeout=30)
    assert info.value.code == 10334
    assert (info.value.details or {}).get("codeName") == "BSONObjectTooLarge"
    # Not resumable: pymongo gives it to the application instead of reopening the stream.
    assert not info.value.has_error_label("ResumableChangeStreamError")
    assert "BSONObj size" in str(info.value) and str(MAX_INTERNAL_SIZE) in str(info.value)


def test_with_the_split_stage_a_large_event_arrives_as_ordered_fragments(db: Database) -> None:
    with watch(db.orders, SPLIT) as stream:
        document = large_update(db.orders)
        parts = fragments(stream)
    assert [p["splitEvent"] for p in parts] == [{"fragment": 1, "of": 2}, {"fragment": 2, "of": 2}]
    # Each fragment has its own resume token, in stream order, and fits in a BSON document.
    tokens = [p["_id"]["_data"] for p in parts]
    assert len(set(tokens)) == 2 and tokens == sorted(tokens)
    assert all(len(bson.encode(p)) <= MAX_INTERNAL_SIZE for p in parts)
    # Fields are never split and never repeated; together they are the whole event.
    fields = [list(p)[2:] for p in parts]
    assert all(list(p)[:2] == ["_id", "splitEvent"] for p in parts)
    assert sorted(fields[0] + fields[1]) == sorted(EVENT_FIELDS | {"fullDocument"})
    # The smallest fields come first, so the first fragment carries the event's context.
    for part, names in zip(parts, fields, strict=True):
        sizes = [len(bson.encode({name: part[name]})) for name in names]
        assert sizes == sorted(sizes)
    assert set(fields[0]) == EVENT_FIELDS and fields[1] == ["fullDocument"]
    merged = {k: v for p in parts for k, v in p.items() if k not in ("_id", "splitEvent")}
    assert merged["fullDocument"] == document
    assert merged["updateDescription"]["updatedFields"] == {"status": "shipped", "more": "b" * (5 * MB)}
    assert merged["operationType"] == "update" and merged["documentKey"] == {"_id": 1}


def test_small_events_are_not_split(db: Database) -> None:
    with watch(db.orders, SPLIT) as stream:
        db.orders.insert_one({"_id": 1, "big": "a" * (10 * MB)})
        event = next_event(stream, timeout=30)
    assert "splitEvent" not in event and len(event["fullDocument"]["big"]) == 10 * MB


def test_resume_from_a_fragment_token_returns_the_next_fragment(db: Database) -> None:
    with watch(db.orders, SPLIT) as stream:
        large_update(db.orders)
        first, last = fragments(stream)
        db.orders.insert_one({"_id": 2})
        after = next_event(stream)
    with watch(db.orders, SPLIT, resume_after=first["_id"]) as resumed:
        assert next_event(resumed, timeout=30) == last
    # The last fragment's token resumes after the whole event.
    with watch(db.orders, SPLIT, resume_after=last["_id"]) as resumed:
        assert next_event(resumed)["_id"] == after["_id"]


def test_the_position_never_goes_back_before_the_fragment_resumed_from(db: Database) -> None:
    with watch(db.orders, SPLIT) as stream:
        large_update(db.orders)
        parts = fragments(stream)
    for resume_from in parts:  # nothing was written after the event
        with watch(db.orders, SPLIT, resume_after=resume_from["_id"]) as resumed:
            while resumed.try_next() is not None:
                pass
            assert resumed.resume_token is not None
            assert resumed.resume_token["_data"] >= parts[-1]["_id"]["_data"]


def test_resuming_from_a_fragment_token_needs_the_split_stage(db: Database) -> None:
    with watch(db.orders, SPLIT) as stream:
        large_update(db.orders)
        first, _ = fragments(stream)
    with pytest.raises(OperationFailure) as info:
        watch(db.orders, resume_after=first["_id"])
    assert info.value.code == 280  # ChangeStreamFatalError
    assert "$changeStreamSplitLargeEvent" in str(info.value)
    assert info.value.has_error_label("NonResumableChangeStreamError")


@pytest.mark.parametrize(
    ("pipeline", "code"),
    [
        ([{"$changeStreamSplitLargeEvent": {}}, {"$match": {}}], 7182802),
        ([{"$changeStreamSplitLargeEvent": {}}, {"$changeStreamSplitLargeEvent": {}}], 7182802),
        ([{"$changeStreamSplitLargeEvent": {"x": 1}}], 7182800),
    ],
)
def test_the_split_stage_must_be_last_and_empty(db: Database, pipeline: list[dict], code: int) -> None:
    with pytest.raises(OperationFailure) as info:
        db.orders.watch(pipeline)
    assert info.value.code == code
    assert "$changeStreamSplitLargeEvent" in str(info.value)


def test_the_split_stage_is_refused_outside_a_change_stream(db: Database) -> None:
    db.orders.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as info:
        list(db.orders.aggregate(SPLIT))
    assert info.value.code == 20  # IllegalOperation


def test_fragments_straddle_batches_of_at_most_16mb(db: Database) -> None:
    """A batch holds at most 16 MB: the two fragments come in two getMores, and each batch's
    postBatchResumeToken is the last fragment it returned (so a resume continues inside the event)."""
    reply = db.command(
        "aggregate",
        "orders",
        pipeline=[
            {"$changeStream": {"fullDocument": "updateLookup"}},
            {"$match": {"operationType": "update"}},
            *SPLIT,
        ],
        cursor={},
    )
    cursor_id = reply["cursor"]["id"]
    large_update(db.orders)
    batches: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while sum(len(b["nextBatch"]) for b in batches) < 2 and time.monotonic() < deadline:
        more = db.command("getMore", cursor_id, collection="orders", maxTimeMS=1000)["cursor"]
        if more["nextBatch"]:
            batches.append(more)
    db.command("killCursors", "orders", cursors=[cursor_id])
    assert [[d["splitEvent"]["fragment"] for d in b["nextBatch"]] for b in batches] == [[1], [2]]
    assert [b["postBatchResumeToken"] for b in batches] == [b["nextBatch"][-1]["_id"] for b in batches]


def test_an_update_past_16mb_is_refused_and_changes_nothing(db: Database) -> None:
    db.orders.insert_one({"_id": 1, "big": "a" * (10 * MB)})
    with watch(db.orders) as stream:
        with pytest.raises(WriteError) as far:
            db.orders.update_one({"_id": 1}, {"$set": {"more": "b" * (7 * MB)}})
        with pytest.raises(WriteError) as near:  # over the user limit, within what mongod can build
            db.orders.update_one({"_id": 1}, {"$set": {"more": "b" * (6 * MB + 4096)}})
        db.orders.insert_one({"_id": 3})
        event = next_event(stream)
    assert far.value.code == 10334 and "BSONObj size" in str(far.value)
    assert near.value.code == 17419 and f"larger than {MAX_USER_SIZE}" in str(near.value)
    assert db.orders.find_one({"_id": 1}, {"big": 0}) == {"_id": 1}
    assert event["documentKey"] == {"_id": 3}  # the refused writes made no events


def test_an_insert_over_16mb_is_refused(mongo_client: pymongo.MongoClient, db: Database) -> None:
    # pymongo refuses such a document before sending it; a raw OP_MSG shows the server's answer.
    document = {"_id": 1, "big": "a" * (MAX_USER_SIZE - 10)}
    message = _op_msg({"insert": "orders", "$db": db.name}, sequences={"documents": [document]})
    reply = _raw_roundtrip(mongo_client, message, timeout=30)
    assert struct.unpack_from("<i", reply, 8)[0] == 7  # responseTo
    answer = bson.decode(reply[21:])
    assert answer["n"] == 0
    assert answer["writeErrors"][0]["code"] == 2  # BadValue
    assert "object to insert too large" in answer["writeErrors"][0]["errmsg"]
    assert db.orders.count_documents({}) == 0


def test_pre_and_post_images_over_16mb_are_split_too(db: Database) -> None:
    db.create_collection("orders", changeStreamPreAndPostImages={"enabled": True})
    db.orders.insert_one({"_id": 1, "big": "a" * (9 * MB)})
    options = {"full_document": "whenAvailable", "full_document_before_change": "whenAvailable"}
    with db.orders.watch(SPLIT, max_await_time_ms=AWAIT_MS, **options) as stream:
        db.orders.update_one({"_id": 1}, {"$set": {"more": "b" * (3 * MB)}})  # 12 MB + 9 MB + 3 MB
        parts = fragments(stream)
    merged = {k: v for p in parts for k, v in p.items() if k not in ("_id", "splitEvent")}
    assert len(parts) == 2
    assert merged["fullDocumentBeforeChange"] == {"_id": 1, "big": "a" * (9 * MB)}
    assert merged["fullDocument"] == {"_id": 1, "big": "a" * (9 * MB), "more": "b" * (3 * MB)}
    assert list(parts[1])[2:] == ["fullDocument"]  # the largest field comes last
