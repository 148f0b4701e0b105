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


def test_transaction_on_a_large_collection_sees_own_writes_and_all_others(
    mongo_client: pymongo.MongoClient, db: Database
) -> None:
    db.create_collection("big")
    db.big.insert_many([{"_id": i, "even": i % 2 == 0} for i in range(5000)])
    with mongo_client.start_session() as session:
        session.start_transaction()
        db.big.insert_one({"_id": "new"}, session=session)
        db.big.update_one({"_id": 10}, {"$set": {"even": False}}, session=session)
        db.big.delete_one({"_id": 11}, session=session)
        # A duplicate of a document the transaction never read is caught at the write.
        with pytest.raises(DuplicateKeyError):
            db.big.insert_one({"_id": 4999}, session=session)
        session.abort_transaction()
    assert db.big.count_documents({}) == 5000
    assert db.big.find_one({"_id": 10})["even"] is True

    with mongo_client.start_session() as session:
        session.start_transaction()
        db.big.insert_one({"_id": "new"}, session=session)
        db.big.update_one({"_id": 10}, {"$set": {"even": False}}, session=session)
        db.big.delete_one({"_id": 11}, session=session)
        # Reads after the writes see them, and every document the transaction did not touch.
        assert db.big.count_documents({"even": True}, session=session) == 2499
        assert db.big.find_one({"_id": 11}, session=session) is None
        assert db.big.count_documents({}, session=session) == 5000
        assert db.big.find_one({"_id": 4998}, session=session) == {"_id": 4998, "even": True}
        assert db.big.find_one({"_id": "new"}) is None  # invisible outside until commit
        session.commit_transaction()
    assert db.big.count_documents({}) == 5000
    assert db.big.find_one({"_id": "new"}) == {"_id": "new"}
    assert db.big.find_one({"_id": 10})["even"] is False
    assert db.big.find_one({"_id": 11}) is None


def test_unique_clash_with_an_unread_document_raises_at_the_write(
    mongo_client: pymongo.MongoClient, db: Database
) -> None:
    db.create_collection("u")
    db.u.create_index("key", unique=True)
    db.u.insert_many([{"_id": i, "key": f"k{i}"} for i in range(50)])

    def insert(session: ClientSession) -> None:
        db.u.insert_one({"_id": "new", "key": "k40"}, session=session)

    def update(session: ClientSession) -> None:
        db.u.update_one({"_id": 1}, {"$set": {"key": "k40"}}, session=session)

    for body in (insert, update):
        with mongo_client.start_session() as session, pytest.raises(DuplicateKeyError):
            session.with_transaction(body)
    assert db.u.count_documents({}) == 50
    assert db.u.find_one({"_id": 1}) == {"_id": 1, "key": "k1"}


def test_failed_commit_undoes_its_writes_and_keeps_other_documents(
    mongo_client: pymongo.MongoClient, db: Database, only_double: None
) -> None:
    # On mongod the outside insert would wait for the transaction (a write conflict); the double
    # finds the clash when commit replays the transaction's writes, and commit fails.
    db.create_collection("acc")
    db.create_collection("other")
    db.acc.insert_many([{"_id": i, "n": i} for i in range(100)])
    with db.watch(max_await_time_ms=200) as stream:
        with mongo_client.start_session() as session:
            session.start_transaction()
            db.acc.update_many({"_id": {"$lt": 10}}, {"$inc": {"n": 100}}, session=session)
            db.acc.delete_one({"_id": 50}, session=session)
            db.acc.replace_one({"_id": 60}, {"replaced": True}, session=session)
            db.other.insert_one({"_id": "o"}, session=session)
            db.fresh.insert_one({"_id": "f"}, session=session)  # a collection the commit would create
            db.acc.insert_one({"_id": "late"}, session=session)
            db.acc.insert_one({"_id": "late", "outside": True})  # committed meanwhile
            db.acc.insert_one({"_id": "more"})
            with pytest.raises(DuplicateKeyError):
                session.commit_transaction()
        assert [e["documentKey"]["_id"] for e in take_events(stream, 2)] == ["late", "more"]
        assert_no_event(stream)  # nothing of the failed commit
    expected = [{"_id": i, "n": i} for i in range(100)] + [{"_id": "late", "outside": True}, {"_id": "more"}]
    assert sorted(db.acc.find(), key=lambda d: str(d["_id"])) == sorted(expected, key=lambda d: str(d["_id"]))
    assert db.other.count_documents({}) == 0
    assert "fresh" not in db.list_collection_names()
