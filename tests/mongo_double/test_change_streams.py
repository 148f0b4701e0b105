"""Change streams with MongoDB 7.0 semantics: event shapes, options, resume, waiting, invalidation."""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

import pymongo
import pytest
from bson import Timestamp
from pymongo.change_stream import ChangeStream
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import OperationFailure

from tests.mongo_double.helpers import assert_no_event, next_event, take_events

AWAIT_MS = 200  # short awaits keep the suite fast; a getMore that finds events returns at once

BASE = {"_id", "operationType", "clusterTime", "wallTime", "ns"}


def watch(target: pymongo.MongoClient | Database | Collection, **kwargs: Any) -> ChangeStream:
    """watch() with a short await, so a try_next() that finds nothing returns quickly."""
    kwargs.setdefault("max_await_time_ms", AWAIT_MS)
    return target.watch(**kwargs)


def test_insert_update_replace_delete_event_shapes(db: Database) -> None:
    with watch(db.c) as stream:
        db.c.insert_one({"_id": 1, "a": 1, "sub": {"x": 1, "y": 2}, "arr": [1, 2, 3]})
        db.c.update_one({"_id": 1}, {"$set": {"a": 2, "sub.x": 5}, "$unset": {"sub.y": ""}})
        db.c.update_one({"_id": 1}, {"$pop": {"arr": 1}})
        db.c.replace_one({"_id": 1}, {"b": 1})
        db.c.delete_one({"_id": 1})
        insert, update, truncate, replace, delete = take_events(stream, 5)
    ns = {"db": db.name, "coll": "c"}
    assert set(insert) == BASE | {"fullDocument", "documentKey"}
    assert insert["operationType"] == "insert" and insert["ns"] == ns
    assert insert["fullDocument"] == {"_id": 1, "a": 1, "sub": {"x": 1, "y": 2}, "arr": [1, 2, 3]}
    assert insert["documentKey"] == {"_id": 1}
    assert isinstance(insert["clusterTime"], Timestamp)
    assert isinstance(insert["wallTime"], datetime.datetime) and insert["wallTime"].microsecond % 1000 == 0
    assert set(update) == BASE | {"documentKey", "updateDescription"}
    assert update["updateDescription"] == {
        "updatedFields": {"a": 2, "sub.x": 5},
        "removedFields": ["sub.y"],
        "truncatedArrays": [],
    }
    assert truncate["updateDescription"]["truncatedArrays"] == [{"field": "arr", "newSize": 2}]
    assert set(replace) == BASE | {"fullDocument", "documentKey"}
    assert replace["operationType"] == "replace" and replace["fullDocument"] == {"_id": 1, "b": 1}
    assert set(delete) == BASE | {"documentKey"} and delete["operationType"] == "delete"
    times = [e["clusterTime"] for e in (insert, update, truncate, replace, delete)]
    assert times == sorted(times) and len(set(times)) == 5


def test_update_description_paths(db: Database) -> None:
    db.c.insert_one({"_id": 1, "sub": {"x": 1, "y": 2}, "arr": [1], "n": 1, "old": 0})
    with watch(db.c) as stream:
        db.c.update_one({"_id": 1}, {"$set": {"sub": {"z": 3}}, "$inc": {"n": 0}})
        db.c.update_one({"_id": 1}, {"$push": {"arr": {"$each": [2, 3]}}, "$rename": {"old": "new"}})
        db.c.update_one({"_id": 1}, {"$set": {"sub.z": 4, "n": 1}})
        whole, array, nested = take_events(stream, 3)
    assert whole["updateDescription"]["updatedFields"] == {"sub": {"z": 3}}  # $inc by 0 is no change
    assert whole["updateDescription"]["removedFields"] == []
    assert array["updateDescription"]["updatedFields"] == {"arr.1": 2, "arr.2": 3, "new": 0}
    assert array["updateDescription"]["removedFields"] == ["old"]
    assert nested["updateDescription"]["updatedFields"] == {"sub.z": 4}


def test_multi_update_failing_half_way_reports_what_changed(db: Database) -> None:
    db.c.create_index("k", unique=True)
    db.c.insert_many([{"_id": 1, "k": 1}, {"_id": 2, "k": 2}, {"_id": 3, "k": 3}])
    with watch(db.c) as stream:
        with pytest.raises(pymongo.errors.WriteError) as info:
            db.c.update_many({}, {"$set": {"k": 9}})  # the second document clashes with the first
        assert info.value.code == 11000
        changed = [d["_id"] for d in db.c.find({"k": 9})]
        events = take_events(stream, len(changed)) if changed else []
        assert_no_event(stream)
    assert [e["documentKey"]["_id"] for e in events] == changed


def test_resume_tokens_sort_in_event_order(db: Database) -> None:
    with watch(db.c) as stream:
        db.c.insert_many([{"_id": i} for i in range(30)])
        events = take_events(stream, 30)
    tokens = [e["_id"]["_data"] for e in events]
    assert tokens == sorted(tokens) and len(set(tokens)) == 30
    assert [e["documentKey"]["_id"] for e in events] == list(range(30))


def test_upsert_is_an_insert_event(db: Database) -> None:
    with watch(db.c) as stream:
        db.c.update_one({"_id": "u"}, {"$set": {"v": 1}}, upsert=True)
        event = next_event(stream)
    assert event["operationType"] == "insert" and event["fullDocument"] == {"_id": "u", "v": 1}


def test_database_and_cluster_streams(mongo_client: pymongo.MongoClient, db: Database) -> None:
    other = mongo_client[db.name + "_b"]
    try:
        with watch(db) as db_stream, watch(mongo_client) as cluster_stream:
            db.x.insert_one({"_id": 1})
            db.y.insert_one({"_id": 2})
            other.z.insert_one({"_id": 3})
            assert [e["ns"]["coll"] for e in take_events(db_stream, 2)] == ["x", "y"]
            seen = []
            while len(seen) < 3:
                event = next_event(cluster_stream)
                if event["ns"]["db"] in (db.name, other.name):  # a real server may carry other traffic
                    seen.append((event["ns"]["db"], event["ns"]["coll"]))
            assert seen == [(db.name, "x"), (db.name, "y"), (other.name, "z")]
            assert_no_event(db_stream)
    finally:
        mongo_client.drop_database(other.name)


def test_pipeline_stages_after_change_stream(db: Database) -> None:
    pipeline = [
        {"$match": {"operationType": "insert", "fullDocument.keep": True}},
        {"$addFields": {"extra": "$fullDocument.n"}},
        {"$set": {"flag": True}},
        {"$project": {"operationType": 1, "fullDocument": 1, "extra": 1, "flag": 1}},
    ]
    with watch(db.c, pipeline=pipeline) as stream:
        db.c.insert_many([{"_id": 1, "keep": False, "n": 1}, {"_id": 2, "keep": True, "n": 2}])
        db.c.delete_one({"_id": 2})
        db.c.insert_one({"_id": 3, "keep": True, "n": 3})
        first, second = take_events(stream, 2)
    assert set(first) == {"_id", "operationType", "fullDocument", "extra", "flag"}
    assert (first["extra"], first["flag"], second["extra"]) == (2, True, 3)


def test_replace_root_keeps_token(db: Database) -> None:
    pipeline = [{"$replaceRoot": {"newRoot": {"_id": "$_id", "doc": "$fullDocument"}}}]
    with watch(db.c, pipeline=pipeline) as stream:
        db.c.insert_one({"_id": 1})
        event = next_event(stream)
    assert event["doc"] == {"_id": 1} and "_data" in event["_id"]
    pipeline = [{"$replaceWith": {"_id": "$_id", "op": "$operationType"}}]
    with watch(db.c, pipeline=pipeline) as stream:
        db.c.delete_one({"_id": 1})
        event = next_event(stream)
    assert set(event) == {"_id", "op"} and event["op"] == "delete"


def test_stage_not_allowed_in_change_stream(db: Database) -> None:
    with pytest.raises(OperationFailure) as info, db.c.watch([{"$group": {"_id": None}}]):
        pass
    assert "$group" in str(info.value)


def test_full_document_update_lookup(db: Database) -> None:
    db.c.insert_one({"_id": 1, "v": 0})
    with watch(db.c, full_document="updateLookup") as stream:
        db.c.update_one({"_id": 1}, {"$set": {"v": 1}})
        event = next_event(stream)
    assert event["fullDocument"] == {"_id": 1, "v": 1}
    with watch(db.c, full_document="updateLookup") as stream:
        db.c.update_one({"_id": 1}, {"$set": {"v": 2}})
        db.c.delete_one({"_id": 1})
        update, delete = take_events(stream, 2)
    assert update["fullDocument"] is None  # looked up after the delete: gone
    assert delete["operationType"] == "delete" and "fullDocument" not in delete


def test_pre_and_post_images(db: Database) -> None:
    db.create_collection("img", changeStreamPreAndPostImages={"enabled": True})
    db.img.insert_one({"_id": 1, "v": 0})
    with watch(db.img, full_document="required", full_document_before_change="required") as stream:
        db.img.update_one({"_id": 1}, {"$set": {"v": 1}})
        db.img.replace_one({"_id": 1}, {"v": 2})
        db.img.delete_one({"_id": 1})
        update, replace, delete = take_events(stream, 3)
    assert (update["fullDocumentBeforeChange"], update["fullDocument"]) == (
        {"_id": 1, "v": 0},
        {"_id": 1, "v": 1},
    )
    assert replace["fullDocumentBeforeChange"] == {"_id": 1, "v": 1}
    assert delete["fullDocumentBeforeChange"] == {"_id": 1, "v": 2}


def test_when_available_without_images_is_null(db: Database) -> None:
    db.plain.insert_one({"_id": 1})
    with watch(
        db.plain, full_document="whenAvailable", full_document_before_change="whenAvailable"
    ) as stream:
        db.plain.update_one({"_id": 1}, {"$set": {"v": 1}})
        event = next_event(stream)
    assert event["fullDocument"] is None and event["fullDocumentBeforeChange"] is None


def test_required_pre_image_missing_fails(db: Database) -> None:
    db.plain.insert_one({"_id": 1})
    with watch(db.plain, full_document_before_change="required") as stream:
        db.plain.update_one({"_id": 1}, {"$set": {"v": 1}})
        with pytest.raises(OperationFailure):
            next_event(stream)


def test_drop_then_invalidate(db: Database) -> None:
    db.c.insert_one({"_id": 1})
    with watch(db.c) as stream:
        db.c.drop()
        drop, invalidate = take_events(stream, 2)
        assert not stream.alive
    assert (
        set(drop) == BASE and drop["operationType"] == "drop" and drop["ns"] == {"db": db.name, "coll": "c"}
    )
    assert invalidate["operationType"] == "invalidate"
    assert set(invalidate) == {"_id", "operationType", "clusterTime", "wallTime"}
    assert invalidate["_id"]["_data"] > drop["_id"]["_data"]
    # resumeAfter cannot pass an invalidate; startAfter can.
    with pytest.raises(OperationFailure), db.c.watch(resume_after=invalidate["_id"]) as s:
        s.try_next()
    with watch(db.c, start_after=invalidate["_id"]) as after:
        db.c.insert_one({"_id": 2})
        event = next_event(after)
    assert event["operationType"] == "insert" and event["documentKey"] == {"_id": 2}


def test_rename_then_invalidate(db: Database) -> None:
    db.src.insert_one({"_id": 1})
    with watch(db.src) as stream, watch(db) as db_stream:
        db.src.rename("dst")
        rename, invalidate = take_events(stream, 2)
        db_rename = next_event(db_stream)
        assert db_stream.alive
    assert rename["operationType"] == "rename"
    assert rename["ns"] == {"db": db.name, "coll": "src"} and rename["to"] == {"db": db.name, "coll": "dst"}
    assert invalidate["operationType"] == "invalidate"
    assert db_rename["operationType"] == "rename"


def test_drop_database_events(mongo_client: pymongo.MongoClient, db: Database) -> None:
    db.c.insert_one({"_id": 1})
    with watch(db) as stream:
        mongo_client.drop_database(db.name)
        drop, drop_db, invalidate = take_events(stream, 3)
    assert drop["operationType"] == "drop" and drop["ns"] == {"db": db.name, "coll": "c"}
    assert drop_db["operationType"] == "dropDatabase" and drop_db["ns"] == {"db": db.name}
    assert invalidate["operationType"] == "invalidate"


def test_post_batch_resume_token_and_resume_after(db: Database) -> None:
    with watch(db.c) as stream:
        assert stream.try_next() is None
        idle_token = stream.resume_token  # postBatchResumeToken of an empty batch
        assert idle_token is not None and "_data" in idle_token
        db.c.insert_many([{"_id": i} for i in range(5)])
        first_two = take_events(stream, 2)
        token = stream.resume_token
    assert token == first_two[1]["_id"]
    with watch(db.c, resume_after=token) as resumed:
        assert [e["documentKey"]["_id"] for e in take_events(resumed, 3)] == [2, 3, 4]
        assert_no_event(resumed)
    with watch(db.c, resume_after=idle_token) as from_idle:
        assert [e["documentKey"]["_id"] for e in take_events(from_idle, 5)] == [0, 1, 2, 3, 4]
        assert_no_event(from_idle)


def test_idle_token_resumes_without_loss_or_repeat(db: Database) -> None:
    db.c.insert_one({"_id": "before"})
    with watch(db.c) as stream:
        assert stream.try_next() is None
        token = stream.resume_token
    db.c.insert_one({"_id": "after"})
    with watch(db.c, resume_after=token) as resumed:
        assert next_event(resumed)["documentKey"] == {"_id": "after"}
        assert_no_event(resumed)


def test_start_at_operation_time(db: Database) -> None:
    db.c.insert_one({"_id": 0})
    with db.client.start_session() as session:
        db.c.insert_one({"_id": 1}, session=session)
        start = session.operation_time  # the insert's own time: startAtOperationTime is inclusive
    db.c.insert_one({"_id": 2})
    with watch(db.c, start_at_operation_time=start) as stream:
        ids = [e["documentKey"]["_id"] for e in take_events(stream, 2)]
    assert ids == [1, 2]


def test_get_more_waits_without_blocking_writers(db: Database) -> None:
    results: list = []
    with db.c.watch(max_await_time_ms=5000) as stream:

        def listen() -> None:
            results.append(next_event(stream, timeout=20))

        listener = threading.Thread(target=listen)
        listener.start()
        time.sleep(0.2)  # let the listener's getMore start waiting
        started = time.monotonic()
        db.c.insert_one({"_id": "w"})
        write_took = time.monotonic() - started
        listener.join(timeout=20)
    assert results and results[0]["documentKey"] == {"_id": "w"}
    assert write_took < 2.0  # the waiting getMore (5 s) did not hold the write back


def test_many_writers_one_listener(db: Database) -> None:
    writers, per_writer = 4, 50
    with watch(db.c, batch_size=50) as stream:

        def write(w: int) -> None:
            for i in range(per_writer):
                db.c.insert_one({"_id": f"{w}-{i}", "w": w, "i": i})

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        events = take_events(stream, writers * per_writer, timeout=30)
        for t in threads:
            t.join()
        assert_no_event(stream)
    per = {w: [e["fullDocument"]["i"] for e in events if e["fullDocument"]["w"] == w] for w in range(writers)}
    assert all(per[w] == list(range(per_writer)) for w in range(writers))
    tokens = [e["_id"]["_data"] for e in events]
    assert tokens == sorted(tokens)


def test_kill_cursors_and_cursor_not_found(db: Database) -> None:
    reply = db.command("aggregate", "c", pipeline=[{"$changeStream": {}}], cursor={})
    cursor_id = reply["cursor"]["id"]
    assert cursor_id != 0 and "postBatchResumeToken" in reply["cursor"]
    assert reply["cursor"]["ns"] == f"{db.name}.c"
    killed = db.command("killCursors", "c", cursors=[cursor_id])
    assert killed["cursorsKilled"] == [cursor_id]
    with pytest.raises(OperationFailure) as info:
        db.command("getMore", cursor_id, collection="c")
    assert info.value.code == 43


def test_get_more_reply_carries_post_batch_resume_token(db: Database) -> None:
    reply = db.command("aggregate", "c", pipeline=[{"$changeStream": {}}], cursor={})
    cursor_id = reply["cursor"]["id"]
    db.c.insert_one({"_id": 1})
    more = db.command("getMore", cursor_id, collection="c", maxTimeMS=1000)
    assert len(more["cursor"]["nextBatch"]) == 1
    assert more["cursor"]["postBatchResumeToken"]["_data"] >= more["cursor"]["nextBatch"][0]["_id"]["_data"]
    started = time.monotonic()
    empty = db.command("getMore", cursor_id, collection="c", maxTimeMS=300)
    assert time.monotonic() - started >= 0.25  # an empty getMore awaits maxTimeMS before answering
    assert empty["cursor"]["nextBatch"] == [] and "postBatchResumeToken" in empty["cursor"]
    db.command("killCursors", "c", cursors=[cursor_id])


def test_database_stream_namespace(db: Database) -> None:
    reply = db.command("aggregate", 1, pipeline=[{"$changeStream": {}}], cursor={})
    assert reply["cursor"]["ns"] == f"{db.name}.$cmd.aggregate"
    db.command("killCursors", "$cmd.aggregate", cursors=[reply["cursor"]["id"]])
