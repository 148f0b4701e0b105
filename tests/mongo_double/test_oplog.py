"""local.oplog.rs: the oldest and newest entries, as monitoring reads the oplog window.

The first tests run against mongo_double, or a real MongoDB 7.0 replica set when MONGODB_URI is set;
the trimming tests need the test server's small oplog (a subprocess with --oplog-size).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pymongo
import pytest
from bson import ObjectId, Timestamp
from pymongo.database import Database
from pymongo.errors import OperationFailure

from tests.mongo_double.helpers import next_event
from tests.mongo_double.test_cli_and_history import Double


def _oplog(client: pymongo.MongoClient) -> pymongo.collection.Collection:
    return client.local["oplog.rs"]


def _edge(client: pymongo.MongoClient, direction: int, query: dict | None = None) -> dict:
    doc = _oplog(client).find(query or {}).sort("$natural", direction).limit(1).next()
    assert isinstance(doc, dict)
    return doc


def test_oldest_and_newest_entries_bound_the_writes(mongo_client: pymongo.MongoClient, db: Database) -> None:
    _id = ObjectId()
    db.c.insert_one({"_id": _id, "x": 1})
    db.c.update_one({"_id": _id}, {"$set": {"x": 2}})
    db.c.delete_one({"_id": _id})
    oldest = _edge(mongo_client, 1)
    ns = f"{db.name}.c"
    newest = _edge(mongo_client, -1, {"ns": ns})
    assert isinstance(oldest["ts"], Timestamp) and isinstance(oldest["wall"], datetime.datetime)
    assert oldest["ts"] <= newest["ts"] and oldest["wall"] <= newest["wall"]
    assert (newest["op"], newest["o"]) == ("d", {"_id": _id})
    ops = [e["op"] for e in _oplog(mongo_client).find({"ns": ns}).sort("$natural", 1)]
    assert ops == ["i", "u", "d"]
    insert = _oplog(mongo_client).find_one({"ns": ns, "op": "i"})
    assert insert is not None and insert["o"] == {"_id": _id, "x": 1}


def test_projection_and_limit(mongo_client: pymongo.MongoClient, db: Database) -> None:
    db.c.insert_many([{"n": i} for i in range(3)])
    docs = list(_oplog(mongo_client).find({"ns": f"{db.name}.c"}, {"ts": 1, "wall": 1, "_id": 0}).limit(2))
    assert len(docs) == 2
    assert all(set(doc) == {"ts", "wall"} for doc in docs)


@pytest.fixture
def small_oplog() -> Iterator[Double]:
    double = Double("--oplog-size", "5")
    yield double
    double.stop()


def test_fresh_set_starts_with_the_initiating_entry(small_oplog: Double) -> None:
    oldest = _edge(small_oplog.client, 1)
    assert (oldest["op"], oldest["o"]) == ("n", {"msg": "initiating set"})
    assert _edge(small_oplog.client, -1) == oldest  # nothing written yet


def test_oldest_entry_is_the_oplog_window_that_resuming_needs(small_oplog: Double) -> None:
    coll = small_oplog.client.t.c
    with coll.watch(max_await_time_ms=100) as stream:
        coll.insert_one({"_id": 0})
        first = next_event(stream)
        events = []
        for i in range(1, 7):  # 7 writes in a 5-entry oplog: _id 0 and 1 go
            coll.insert_one({"_id": i})
            events.append(next_event(stream))
        events = events[1:]
    oldest = _edge(small_oplog.client, 1)
    assert oldest["op"] == "i" and oldest["o"] == {"_id": 2}
    assert oldest["ts"] == events[0]["clusterTime"] and oldest["ts"] > first["clusterTime"]
    assert oldest["wall"] == events[0]["wallTime"]
    assert len(list(_oplog(small_oplog.client).find())) == 5
    # A position before the oldest entry is history lost; the oldest entry's own event resumes.
    with pytest.raises(OperationFailure) as info, coll.watch(resume_after=first["_id"]) as lost:
        lost.try_next()
    assert info.value.code == 286
    with coll.watch(resume_after=events[0]["_id"], max_await_time_ms=100) as kept:
        assert next_event(kept)["documentKey"] == {"_id": 3}


def test_unsupported_sort_is_refused(small_oplog: Double) -> None:
    with pytest.raises(OperationFailure) as info:
        list(_oplog(small_oplog.client).find().sort("ts", 1))
    assert info.value.code == 115
