"""Read-only views (create with viewOn/pipeline) and their change events, as MongoDB 7.0 documents them.

Written to MongoDB's documentation and mongod's own behaviour, so they also hold against a real
mongod 7.0 (MONGODB_URI).
"""

from __future__ import annotations

from typing import Any

import pytest
from pymongo.database import Database
from pymongo.errors import OperationFailure, WriteError

from tests.mongo_double.helpers import assert_no_event, take_events

AWAIT_MS = 200
ACTIVE = [{"$match": {"active": True}}, {"$project": {"name": 1, "age": 1}}]


@pytest.fixture
def users(db: Database) -> Database:
    db.users.insert_many(
        [
            {"_id": 1, "name": "ann", "age": 31, "active": True, "tags": ["a", "b"]},
            {"_id": 2, "name": "bob", "age": 25, "active": False, "tags": ["b"]},
            {"_id": 3, "name": "cyd", "age": 40, "active": True, "tags": ["c"]},
            {"_id": 4, "name": "dee", "age": 22, "active": True, "tags": []},
        ]
    )
    db.create_collection("active", viewOn="users", pipeline=ACTIVE)
    return db


def refused(db: Database, name: str) -> str:
    return f"Namespace {db.name}.{name} is a view, not a collection"


def test_list_collections_shows_the_view_and_system_views(users: Database) -> None:
    (info,) = users.list_collections(filter={"name": "active"})
    assert info == {
        "name": "active",
        "type": "view",
        "options": {"viewOn": "users", "pipeline": ACTIVE},
        "info": {"readOnly": True},
    }
    assert set(users.list_collection_names()) == {"users", "active", "system.views"}
    (names_only,) = users.list_collections(filter={"type": "view"}, nameOnly=True)
    assert names_only == {"name": "active", "type": "view"}


def test_find_runs_the_view_pipeline_then_the_query(users: Database) -> None:
    assert list(users.active.find(sort=[("age", 1)])) == [
        {"_id": 4, "name": "dee", "age": 22},
        {"_id": 1, "name": "ann", "age": 31},
        {"_id": 3, "name": "cyd", "age": 40},
    ]
    query = {"age": {"$gt": 25}}
    found = users.active.find(query, {"name": 1, "_id": 0}, sort=[("age", -1)], skip=1, limit=1)
    assert list(found) == [{"name": "ann"}]
    assert users.active.find_one({"name": "bob"}) is None


def test_count_aggregate_and_distinct_on_a_view(users: Database) -> None:
    assert users.command("count", "active", query={"age": {"$lt": 35}})["n"] == 2
    assert users.active.count_documents({}) == 3
    grouped = users.active.aggregate([{"$group": {"_id": None, "total": {"$sum": "$age"}}}])
    assert list(grouped) == [{"_id": None, "total": 93}]
    assert sorted(users.active.distinct("name")) == ["ann", "cyd", "dee"]
    assert sorted(users.active.distinct("age", {"age": {"$gte": 31}})) == [31, 40]


def test_a_view_on_a_view_unfolds_both_pipelines(users: Database) -> None:
    users.create_collection("young", viewOn="active", pipeline=[{"$match": {"age": {"$lt": 35}}}])
    assert [doc["_id"] for doc in users.young.find(sort=[("_id", 1)])] == [1, 4]


def test_a_view_on_a_missing_collection_is_empty(db: Database) -> None:
    db.create_collection("later", viewOn="nosuch", pipeline=[])
    assert list(db.later.find()) == []
    db.nosuch.insert_one({"_id": 1})
    assert list(db.later.find()) == [{"_id": 1}]


def test_writes_to_a_view_fail_with_command_not_supported_on_view(users: Database) -> None:
    for write in (
        lambda: users.active.insert_one({"_id": 9}),
        lambda: users.active.update_one({"_id": 1}, {"$set": {"age": 1}}),
        lambda: users.active.delete_many({}),
    ):
        with pytest.raises(WriteError) as info:
            write()
        assert info.value.code == 166
        assert info.value.details is not None and info.value.details["errmsg"] == refused(users, "active")
    unordered = users.command(
        "insert", "active", documents=[{"_id": 10}, {"_id": 11}], ordered=False, check=False
    )
    assert [(e["index"], e["code"]) for e in unordered["writeErrors"]] == [(0, 166), (1, 166)]
    assert unordered["n"] == 0
    assert users.users.count_documents({}) == 4


def test_find_and_modify_and_index_commands_fail_on_a_view(users: Database) -> None:
    calls: list[Any] = [
        lambda: users.active.find_one_and_update({"_id": 1}, {"$set": {"age": 1}}),
        lambda: users.active.create_index("age"),
        lambda: list(users.active.list_indexes()),
        lambda: users.active.drop_index("age_1"),
    ]
    for call in calls:
        with pytest.raises(OperationFailure) as info:
            call()
        assert info.value.code == 166, info.value.details
        assert info.value.details is not None and info.value.details["errmsg"] == refused(users, "active")


def test_watch_on_a_view_fails(users: Database) -> None:
    with pytest.raises(OperationFailure) as info:
        users.active.watch(max_await_time_ms=AWAIT_MS)
    assert info.value.code == 166


def test_coll_mod_redefines_a_view(users: Database) -> None:
    users.command("collMod", "active", pipeline=[{"$match": {"active": False}}])
    (info,) = users.list_collections(filter={"name": "active"})
    assert info["options"] == {"viewOn": "users", "pipeline": [{"$match": {"active": False}}]}
    assert [doc["name"] for doc in users.active.find()] == ["bob"]
    users.command("collMod", "active", viewOn="users", pipeline=[{"$match": {"age": 40}}])
    assert [doc["name"] for doc in users.active.find()] == ["cyd"]


def test_drop_of_a_view_leaves_its_source(users: Database) -> None:
    reply = users.command("drop", "active")
    assert "nIndexesWas" not in reply
    assert "active" not in users.list_collection_names()
    assert users.users.count_documents({}) == 4


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ({"create": "bad", "pipeline": []}, 72),  # pipeline without viewOn
        ({"create": "bad", "viewOn": "users", "pipeline": [{"$out": "x"}]}, 167),
        ({"create": "bad", "viewOn": "users", "pipeline": [{"$nope": 1}]}, 40324),
        ({"create": "bad", "viewOn": "bad", "pipeline": []}, 5),  # a cycle
        ({"create": "active", "viewOn": "users", "pipeline": []}, 48),  # exists
        ({"create": "users", "viewOn": "active", "pipeline": []}, 48),
        ({"collMod": "users", "viewOn": "active", "pipeline": []}, 72),  # not a view
        ({"renameCollection": "active", "to": "renamed"}, 166),
    ],
)
def test_bad_view_definitions_are_refused(users: Database, command: dict[str, Any], code: int) -> None:
    target = users
    if "renameCollection" in command:
        target = users.client.admin
        command = {"renameCollection": f"{users.name}.active", "to": f"{users.name}.renamed"}
    with pytest.raises(OperationFailure) as info:
        target.command(command)
    assert info.value.code == code, info.value.details
    assert "bad" not in users.list_collection_names()


def test_view_events_with_show_expanded_events(db: Database) -> None:
    db.create_collection("users")
    with db.watch(show_expanded_events=True, max_await_time_ms=AWAIT_MS) as stream:
        db.create_collection("v", viewOn="users", pipeline=ACTIVE)
        db.command("collMod", "v", viewOn="users", pipeline=[{"$match": {"age": 1}}])
        db.drop_collection("v")
        db.users.insert_one({"_id": 1})
        create, modify, drop, insert = take_events(stream, 4)
    ns = {"db": db.name, "coll": "v"}
    assert list(create) == ["_id", "operationType", "clusterTime", "wallTime", "ns", "operationDescription"]
    assert create["operationType"] == "create" and create["ns"] == ns
    assert create["operationDescription"] == {"viewOn": "users", "pipeline": ACTIVE}
    assert modify["operationType"] == "modify" and modify["ns"] == ns
    assert modify["operationDescription"] == {"viewOn": "users", "pipeline": [{"$match": {"age": 1}}]}
    assert "stateBeforeChange" not in modify and "collectionUUID" not in modify
    assert drop["operationType"] == "drop" and drop["ns"] == ns
    assert set(drop) == {"_id", "operationType", "clusterTime", "wallTime", "ns"}
    assert insert["operationType"] == "insert" and "collectionUUID" in insert


def test_no_view_events_without_the_option_or_on_a_collection_stream(db: Database) -> None:
    db.create_collection("users")
    with (
        db.watch(max_await_time_ms=AWAIT_MS) as plain,
        db.users.watch(show_expanded_events=True, max_await_time_ms=AWAIT_MS) as on_source,
        db.v.watch(show_expanded_events=True, max_await_time_ms=AWAIT_MS) as on_name,
    ):
        db.create_collection("v", viewOn="users", pipeline=[])
        db.drop_collection("v")
        db.users.insert_one({"_id": 1})
        assert take_events(plain, 1)[0]["operationType"] == "insert"
        assert take_events(on_source, 1)[0]["operationType"] == "insert"
        assert_no_event(plain)
        assert_no_event(on_name)
