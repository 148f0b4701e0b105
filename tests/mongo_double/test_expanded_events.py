"""showExpandedEvents (MongoDB 6.0+): DDL events and expanded fields, per MongoDB's change-event reference.

Written to what MongoDB documents, so they also hold against a real mongod 7.0 (MONGODB_URI).
"""

from __future__ import annotations

from typing import Any

import pymongo
from bson import Binary
from pymongo.change_stream import ChangeStream
from pymongo.collection import Collection
from pymongo.database import Database

from tests.mongo_double.helpers import assert_no_event, next_event, take_events

AWAIT_MS = 200
ID_INDEX = {"v": 2, "key": {"_id": 1}, "name": "_id_"}


def watch(target: Database | Collection, **kwargs: Any) -> ChangeStream:
    kwargs.setdefault("max_await_time_ms", AWAIT_MS)
    return target.watch(**kwargs)


def collection_uuid(db: Database, name: str) -> Binary:
    (info,) = db.list_collections(filter={"name": name})
    return info["info"]["uuid"]


def test_create_event_of_an_explicit_and_an_implicit_create(db: Database) -> None:
    with watch(db, show_expanded_events=True) as stream:
        db.create_collection("made")
        db.implicit.insert_one({"_id": 1})
        made, implicit, insert = take_events(stream, 3)
    assert made["operationType"] == "create" and made["ns"] == {"db": db.name, "coll": "made"}
    assert made["operationDescription"] == {"idIndex": ID_INDEX}
    assert made["collectionUUID"] == collection_uuid(db, "made")
    assert "documentKey" not in made and "wallTime" in made
    assert implicit["operationType"] == "create" and implicit["ns"]["coll"] == "implicit"
    assert implicit["collectionUUID"] == insert["collectionUUID"] == collection_uuid(db, "implicit")
    assert insert["operationType"] == "insert"
    assert list(insert)[:5] == ["_id", "operationType", "clusterTime", "collectionUUID", "wallTime"]


def test_create_event_carries_the_collection_options(db: Database) -> None:
    with watch(db, show_expanded_events=True) as stream:
        db.create_collection("images", changeStreamPreAndPostImages={"enabled": True})
        event = next_event(stream)
    assert event["operationDescription"] == {
        "changeStreamPreAndPostImages": {"enabled": True},
        "idIndex": ID_INDEX,
    }


def test_without_the_option_no_ddl_events_and_no_expanded_fields(db: Database) -> None:
    db.create_collection("c")
    with watch(db) as stream:
        db.create_collection("other")
        db.c.create_index("a")
        db.c.drop_index("a_1")
        db.command("collMod", "c", changeStreamPreAndPostImages={"enabled": True})
        db.c.insert_one({"_id": 1})
        insert = next_event(stream)
        assert_no_event(stream)
    assert insert["operationType"] == "insert"
    assert "collectionUUID" not in insert and "operationDescription" not in insert


def test_create_indexes_and_drop_indexes_events(db: Database) -> None:
    db.create_collection("c")
    with watch(db.c, show_expanded_events=True) as stream:
        db.c.create_index([("a", 1)], unique=True)
        db.c.drop_index("a_1")
        created, dropped = take_events(stream, 2)
    uuid = collection_uuid(db, "c")
    index = {"v": 2, "key": {"a": 1}, "name": "a_1", "unique": True}
    assert created["operationType"] == "createIndexes" and created["collectionUUID"] == uuid
    assert created["operationDescription"] == {"indexes": [index]}
    assert dropped["operationType"] == "dropIndexes" and dropped["collectionUUID"] == uuid
    assert dropped["operationDescription"] == {"indexes": [index]}


def test_modify_event_of_coll_mod(db: Database) -> None:
    db.create_collection("c")
    uuid = collection_uuid(db, "c")
    with watch(db.c, show_expanded_events=True) as stream:
        db.command("collMod", "c", changeStreamPreAndPostImages={"enabled": True})
        event = next_event(stream)
    assert event["operationType"] == "modify" and event["collectionUUID"] == uuid
    assert event["ns"] == {"db": db.name, "coll": "c"}
    assert event["operationDescription"] == {"changeStreamPreAndPostImages": {"enabled": True}}
    assert event["stateBeforeChange"] == {"collectionOptions": {"uuid": uuid}}


def test_rename_and_drop_carry_the_collection_uuid(db: Database, mongo_client: pymongo.MongoClient) -> None:
    db.create_collection("a")
    db.create_collection("target")
    uuid, target_uuid = collection_uuid(db, "a"), collection_uuid(db, "target")
    with watch(db, show_expanded_events=True) as stream:
        mongo_client.admin.command(
            "renameCollection", f"{db.name}.a", to=f"{db.name}.target", dropTarget=True
        )
        db.drop_collection("target")
        rename, drop = take_events(stream, 2)
    assert rename["operationType"] == "rename" and rename["collectionUUID"] == uuid
    assert rename["to"] == {"db": db.name, "coll": "target"}
    assert rename["operationDescription"] == {
        "to": {"db": db.name, "coll": "target"},
        "dropTarget": target_uuid,
    }
    assert drop["operationType"] == "drop" and drop["collectionUUID"] == uuid


def test_invalidate_has_no_collection_uuid(db: Database) -> None:
    db.c.insert_one({})
    with watch(db.c, show_expanded_events=True) as stream:
        db.c.drop()
        drop, invalidate = take_events(stream, 2)
    assert drop["operationType"] == "drop"
    assert invalidate["operationType"] == "invalidate"
    assert set(invalidate) == {"_id", "operationType", "clusterTime", "wallTime"}
