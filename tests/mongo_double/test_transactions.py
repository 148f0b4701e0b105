"""Sessions and multi-document transactions."""

from __future__ import annotations

import pymongo
import pytest
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, OperationFailure

from tests.mongo_double.helpers import assert_no_event, next_event, take_events


def test_with_transaction_commits_all_writes(mongo_client: pymongo.MongoClient, db: Database) -> None:
    db.create_collection("acc")
    db.acc.insert_one({"_id": "a", "n": 10})

    def transfer(session: ClientSession) -> None:
        db.acc.update_one({"_id": "a"}, {"$inc": {"n": -3}}, session=session)
        db.acc.update_one(
            {"_id": "b"}, {"$inc": {"n": 3}, "$setOnInsert": {"new": True}}, upsert=True, session=session
        )
        db.acc.insert_one({"_id": "log", "amount": 3}, session=session)
        # Reads inside the transaction see its own writes.
        assert db.acc.find_one({"_id": "b"}, session=session) == {"_id": "b", "n": 3, "new": True}
        assert db.acc.count_documents({}, session=session) == 3

    with mongo_client.start_session() as session:
        session.with_transaction(transfer)
    assert list(db.acc.find().sort("_id", 1)) == [
        {"_id": "a", "n": 7},
        {"_id": "b", "n": 3, "new": True},
        {"_id": "log", "amount": 3},
    ]


def test_uncommitted_writes_are_invisible_and_abort_discards(
    mongo_client: pymongo.MongoClient, db: Database
) -> None:
    db.create_collection("t")
    with mongo_client.start_session() as session:
        session.start_transaction()
        db.t.insert_one({"_id": 1}, session=session)
        db.t.delete_many({}, session=session)
        db.t.insert_one({"_id": 2}, session=session)
        assert db.t.find_one({"_id": 2}) is None  # outside the transaction
        assert db.t.find_one({"_id": 2}, session=session) == {"_id": 2}
        session.abort_transaction()
    assert db.t.count_documents({}) == 0
    with mongo_client.start_session() as session:
        session.start_transaction()
        db.t.insert_one({"_id": 3}, session=session)
        assert db.t.find_one({"_id": 3}) is None
        session.commit_transaction()
    assert db.t.find_one({"_id": 3}) == {"_id": 3}


def test_commit_publishes_events_together_with_lsid_and_txn_number(
    mongo_client: pymongo.MongoClient, db: Database
) -> None:
    db.create_collection("t")
    db.t.insert_one({"_id": "x", "v": 0})
    with db.t.watch(max_await_time_ms=200) as stream:
        with mongo_client.start_session() as session:
            session.start_transaction()
            db.t.insert_one({"_id": 1}, session=session)
            db.t.update_one({"_id": "x"}, {"$set": {"v": 1}}, session=session)
            db.t.delete_one({"_id": "x"}, session=session)
            assert_no_event(stream)  # nothing before commit
            session.commit_transaction()
            lsid = session.session_id
        events = take_events(stream, 3)
    assert [e["operationType"] for e in events] == ["insert", "update", "delete"]
    assert all(e["lsid"]["id"] == lsid["id"] and set(e["lsid"]) == {"id", "uid"} for e in events)
    assert len({e["txnNumber"] for e in events}) == 1
    assert len({e["clusterTime"] for e in events}) == 1


def test_aborted_transaction_publishes_nothing(mongo_client: pymongo.MongoClient, db: Database) -> None:
    db.create_collection("t")
    with db.t.watch(max_await_time_ms=200) as stream:
        with mongo_client.start_session() as session:
            session.start_transaction()
            db.t.insert_one({"_id": 1}, session=session)
            session.abort_transaction()
        db.t.insert_one({"_id": 2})
        assert next_event(stream)["documentKey"] == {"_id": 2}


def test_duplicate_key_in_transaction_raises_and_aborts(
    mongo_client: pymongo.MongoClient, db: Database
) -> None:
    db.create_collection("m")
    db.m.create_index("key", unique=True)
    db.m.insert_one({"key": "k1"})

    def body(session: ClientSession) -> None:
        db.m.insert_one({"key": "k2"}, session=session)
        db.m.insert_one({"key": "k1"}, session=session)

    with mongo_client.start_session() as session, pytest.raises(DuplicateKeyError):
        session.with_transaction(body)
    assert sorted(d["key"] for d in db.m.find()) == ["k1"]


def test_operation_after_abort_is_no_such_transaction(
    mongo_client: pymongo.MongoClient, db: Database
) -> None:
    db.create_collection("m")
    db.m.insert_one({"_id": 1})
    with mongo_client.start_session() as session:
        session.start_transaction()
        with pytest.raises(DuplicateKeyError):
            db.m.insert_one({"_id": 1}, session=session)
        with pytest.raises(OperationFailure) as info:
            db.m.insert_one({"_id": 2}, session=session)
        assert info.value.code == 251
        assert info.value.has_error_label("TransientTransactionError")
        session.abort_transaction()
    assert db.m.count_documents({}) == 1


def test_find_one_and_update_in_transaction(mongo_client: pymongo.MongoClient, db: Database) -> None:
    db.create_collection("q")
    db.q.insert_many([{"_id": 1, "state": "new"}, {"_id": 2, "state": "new"}])

    def claim(session: ClientSession) -> dict:
        return db.q.find_one_and_update(
            {"state": "new"},
            {"$set": {"state": "taken"}},
            sort=[("_id", -1)],
            session=session,
            return_document=pymongo.ReturnDocument.AFTER,
        )

    with mongo_client.start_session() as session:
        assert session.with_transaction(claim) == {"_id": 2, "state": "taken"}
    assert db.q.find_one({"_id": 2})["state"] == "taken"
