"""MongoDB 7.0 write semantics: `_id` stored first, pipeline-style updates and their change events
(`updateDescription` from mongod's document diff, `truncatedArrays`, `disambiguatedPaths`).

Documents carry a padding field where an event's shape is asserted: mongod logs a pipeline update as
a diff only when the diff is smaller than the new document, else as a replacement (a `replace` event).
"""

from __future__ import annotations

import datetime
from typing import Any

import bson
import pymongo
import pytest
from bson import SON, ObjectId
from bson.raw_bson import RawBSONDocument
from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import OperationFailure, WriteError

from tests.mongo_double.helpers import next_event, take_events

AWAIT_MS = 200
PAD = "p" * 200  # makes a document large enough that mongod logs its pipeline updates as diffs


def watch(db: Database, **kwargs: Any) -> Any:
    return db.c.watch(max_await_time_ms=AWAIT_MS, **kwargs)


# ---------------------------------------------------------------------------------------------
# _id first


def _id_last(*fields: tuple[str, Any]) -> RawBSONDocument:
    """A document encoded with `_id` where it is given: pymongo's encoder moves `_id` first in every
    document it encodes itself (insert documents included), but sends raw BSON as it is."""
    raw = RawBSONDocument(bson.encode({"doc": SON(list(fields))}))["doc"]
    assert list(raw) == [name for name, _ in fields]
    return raw


def test_insert_stores_id_first_wherever_the_client_put_it(db: Database) -> None:
    db.create_collection("c")
    with watch(db) as stream:
        db.c.insert_one(_id_last(("a", 1), ("b", 2), ("_id", 5)))
        db.c.insert_many([_id_last(("a", 1), ("_id", 6)), _id_last(("a", 1), ("_id", 7), ("b", 2))])
        events = take_events(stream, 3)
    for _id, fields in ((5, ["_id", "a", "b"]), (6, ["_id", "a"]), (7, ["_id", "a", "b"])):
        stored = db.c.find_one({"_id": _id})
        assert stored is not None and list(stored) == fields
    assert [list(e["fullDocument"]) for e in events] == [["_id", "a", "b"], ["_id", "a"], ["_id", "a", "b"]]


def test_upserts_store_id_first(db: Database) -> None:
    db.create_collection("c")
    with watch(db) as stream:
        operator = db.c.update_one(
            {"k": 1}, {"$set": {"b": 2}, "$setOnInsert": {"c": 3}}, upsert=True
        ).upserted_id
        replacement = db.c.replace_one({"k": 2}, {"b": 2}, upsert=True).upserted_id
        assert db.c.replace_one({"_id": 7}, SON([("b", 2), ("_id", 7)]), upsert=True).upserted_id == 7
        found = db.c.find_one_and_update(
            {"k": 3}, {"$set": {"b": 2}}, upsert=True, return_document=ReturnDocument.AFTER
        )
        pipeline = db.c.update_one({"k": 4}, [{"$set": {"b": 2}}], upsert=True).upserted_id
        events = take_events(stream, 5)
    assert found is not None and list(found) == ["_id", "k", "b"]
    expected = {
        operator: ["_id", "k", "b", "c"],
        replacement: ["_id", "b"],  # a replacement upsert takes only _id from the query
        7: ["_id", "b"],
        found["_id"]: ["_id", "k", "b"],
        pipeline: ["_id", "k", "b"],  # a pipeline runs on the query's equality fields
    }
    for event, (_id, fields) in zip(events, expected.items(), strict=True):
        stored = db.c.find_one({"_id": _id})
        assert stored is not None and list(stored) == fields
        assert event["operationType"] == "insert" and list(event["fullDocument"]) == fields


def test_replacement_with_id_last_is_stored_id_first(db: Database) -> None:
    db.c.insert_one({"_id": 1, "a": 1})
    db.c.replace_one({"_id": 1}, SON([("b", 2), ("_id", 1)]))
    assert list(db.c.find_one({"_id": 1}) or {}) == ["_id", "b"]


# ---------------------------------------------------------------------------------------------
# Pipeline-style updates


def test_pipeline_update_stages_and_expressions(db: Database) -> None:
    db.c.insert_one({"_id": 1, "a": [1, 2, 3, 4], "s": "x", "n": None, "o": {"p": 1}, "gone": 0})
    result = db.c.update_one(
        {"_id": 1},
        [
            {
                "$set": {
                    "concat": {"$concat": ["$s", "y"]},
                    "sum": {"$add": ["$o.p", 1]},
                    "sign": {"$cond": [{"$gt": ["$o.p", 0]}, "pos", "neg"]},
                    "dflt": {"$ifNull": ["$n", "none"]},
                    "head": {"$slice": ["$a", 2]},
                    "big": {"$filter": {"input": "$a", "cond": {"$gt": ["$$this", 2]}}},
                    "lit": {"$literal": "$s"},
                    "o.q": 5,
                }
            },
            {"$addFields": {"size": {"$size": "$a"}}},
            {"$unset": ["gone", "n"]},
        ],
    )
    assert (result.matched_count, result.modified_count) == (1, 1)
    assert db.c.find_one({"_id": 1}) == {
        "_id": 1,
        "a": [1, 2, 3, 4],
        "s": "x",
        "o": {"p": 1, "q": 5},
        "concat": "xy",
        "sum": 2,
        "sign": "pos",
        "dflt": "none",
        "head": [1, 2],
        "big": [3, 4],
        "lit": "$s",
        "size": 4,
    }


def test_pipeline_update_replacing_stages_keep_id(db: Database) -> None:
    db.c.insert_many([{"_id": i, "k": "x", "v": i, "w": 0} for i in (1, 2, 3, 4)])
    db.c.update_one({"_id": 1}, [{"$project": {"v": 1}}])
    db.c.update_one({"_id": 2}, [{"$replaceWith": {"k2": "$k", "v": {"$add": ["$v", 10]}}}])
    db.c.update_one({"_id": 3}, [{"$replaceRoot": {"newRoot": {"only": "$v"}}}])
    many = db.c.update_many({"_id": {"$gte": 3}}, [{"$set": {"m": True}}])
    assert (many.matched_count, many.modified_count) == (2, 2)
    assert list(db.c.find(sort=[("_id", 1)])) == [
        {"_id": 1, "v": 1},
        {"_id": 2, "k2": "x", "v": 12},
        {"_id": 3, "only": 3, "m": True},
        {"_id": 4, "k": "x", "v": 4, "w": 0, "m": True},
    ]


def test_pipeline_update_that_changes_nothing_is_not_a_modification(db: Database) -> None:
    db.c.insert_one({"_id": 1, "a": 1})
    with watch(db) as stream:
        result = db.c.update_one({"_id": 1}, [{"$set": {"a": 1}}])
        db.c.insert_one({"_id": 2})
        event = next_event(stream)
    assert (result.matched_count, result.modified_count) == (1, 0)
    assert event["operationType"] == "insert"  # no event for the no-op update


def test_pipeline_update_now_variable(db: Database) -> None:
    db.c.insert_one({"_id": 1})
    before = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - datetime.timedelta(seconds=5)
    db.c.update_one({"_id": 1}, [{"$set": {"at": "$$NOW"}}])
    stored = db.c.find_one({"_id": 1})
    assert stored is not None and isinstance(stored["at"], datetime.datetime)
    assert stored["at"] >= before


def test_find_and_modify_with_a_pipeline(db: Database) -> None:
    db.c.insert_one({"_id": 1, "n": 1})
    before = db.c.find_one_and_update({"_id": 1}, [{"$set": {"n": {"$add": ["$n", 1]}}}])
    after = db.c.find_one_and_update(
        {"_id": 1}, [{"$set": {"n": {"$multiply": ["$n", 10]}}}], return_document=ReturnDocument.AFTER
    )
    created = db.c.find_one_and_update(
        {"k": "new"},
        [{"$set": {"n": {"$ifNull": ["$n", 0]}}}],
        upsert=True,
        return_document=ReturnDocument.AFTER,
    )
    assert before == {"_id": 1, "n": 1}
    assert after == {"_id": 1, "n": 20}
    assert created is not None and isinstance(created["_id"], ObjectId)
    assert list(created) == ["_id", "k", "n"] and created["k"] == "new" and created["n"] == 0


def test_pipeline_upsert_in_a_transaction(mongo_client: pymongo.MongoClient, db: Database) -> None:
    db.create_collection("c")
    with mongo_client.start_session() as session:
        upserted = session.with_transaction(
            lambda s: db.c.update_one({"k": 1}, [{"$set": {"v": 1}}], upsert=True, session=s).upserted_id
        )
    assert db.c.find_one({"k": 1}) == {"_id": upserted, "k": 1, "v": 1}


@pytest.mark.parametrize(
    ("pipeline", "code"),
    [
        ([{"$match": {"a": 1}}], 72),  # a valid stage, not allowed in an update
        ([{"$bogus": {}}], 40324),
        ([{"$set": {"x": {"$bogus": 1}}}], 168),
        ([{"$set": {"_id": 2}}], 66),
    ],
)
def test_pipeline_update_errors(db: Database, pipeline: list[dict[str, Any]], code: int) -> None:
    db.c.insert_one({"_id": 1, "a": 1})
    with pytest.raises(WriteError) as err:
        db.c.update_one({"_id": 1}, pipeline)
    assert err.value.code == code
    assert db.c.find_one({"_id": 1}) == {"_id": 1, "a": 1}


def test_pipeline_expression_the_double_lacks_is_refused(db: Database, only_double: None) -> None:
    db.c.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as err:
        db.c.update_one({"_id": 1}, [{"$set": {"x": {"$setField": {"field": "a", "input": {}, "value": 1}}}}])
    assert err.value.code == 115 and "$setField" in str(err.value)
    reply = db.command(
        {"update": "c", "updates": [{"q": {"_id": 1}, "u": [{"$set": {"x": "$$k"}}], "c": {"k": 1}}]}
    )
    assert reply["n"] == 0 and reply["writeErrors"][0]["code"] == 115
    assert db.c.find_one({"_id": 1}) == {"_id": 1}


# ---------------------------------------------------------------------------------------------
# Change events of pipeline updates


def test_pipeline_update_event_is_the_document_diff(db: Database) -> None:
    db.c.insert_one(
        {"_id": 1, "pad": PAD, "n": 1, "s": "q", "arr": ["a" * 30, "b" * 30, "c" * 30], "sub": {"x": 1}}
    )
    with watch(db) as stream:
        db.c.update_one(
            {"_id": 1},
            [
                {"$set": {"n": {"$add": ["$n", 1]}, "t": {"$concat": ["$s", "!"]}}},
                {"$set": {"arr": {"$concatArrays": [["new"], {"$slice": ["$arr", 1, 1]}]}}},
                {"$unset": "s"},
            ],
        )
        event = next_event(stream)
    assert event["operationType"] == "update"
    assert event["updateDescription"] == {
        "updatedFields": {"n": 2, "t": "q!", "arr.0": "new"},
        "removedFields": ["s"],
        "truncatedArrays": [{"field": "arr", "newSize": 2}],
    }


def test_pipeline_update_shortening_an_array(db: Database) -> None:
    db.c.insert_one({"_id": 1, "pad": PAD, "tags": ["a" * 20, "b" * 20, "c" * 20, "d" * 20]})
    with watch(db) as stream:
        db.c.update_one({"_id": 1}, [{"$set": {"tags": {"$slice": ["$tags", 2]}}}])
        event = next_event(stream)
    assert event["updateDescription"] == {
        "updatedFields": {},
        "removedFields": [],
        "truncatedArrays": [{"field": "tags", "newSize": 2}],
    }


def test_pipeline_update_larger_than_its_diff_is_a_replace_event(db: Database) -> None:
    db.c.insert_one({"_id": 1, "a": 1})
    with watch(db) as stream:
        db.c.update_one({"_id": 1}, [{"$set": {"a": 2}}])
        event = next_event(stream)
    # A diff would not be smaller than this tiny document: mongod logs the whole document.
    assert event["operationType"] == "replace"
    assert event["fullDocument"] == {"_id": 1, "a": 2}
    assert "updateDescription" not in event


def test_disambiguated_paths_only_with_show_expanded_events(db: Database) -> None:
    db.c.insert_one(
        {
            "_id": 1,
            "pad": PAD,
            "m": {"0": {"1": "x", "pad": PAD}},
            "arr": [[{"0": "y", "pad": PAD}]],
        }
    )
    with watch(db, show_expanded_events=True) as expanded, watch(db) as plain:
        db.c.update_one({"_id": 1}, {"$set": {"plain": 1}})
        db.c.update_one({"_id": 1}, {"$set": {"m.0.1": "z"}})
        db.c.update_one({"_id": 1}, {"$set": {"arr.0.0.0": "w"}})
        db.c.update_one({"_id": 1}, [{"$set": {"m": {"$literal": {"0": {"1": "q", "pad": PAD}}}}}])
        db.c.update_one(
            {"_id": 1},
            [{"$replaceWith": {"$literal": {"_id": 1, "pad": PAD, "m": {"0": {"1": "q", "pad": PAD}},
                                            "arr": [[{"0": "w", "pad": PAD}]], "plain": 1, "x.y": 1}}}],
        )  # fmt: skip
        events = take_events(expanded, 5)
        plain_events = take_events(plain, 5)
    paths = [e["updateDescription"]["disambiguatedPaths"] for e in events]
    assert paths == [
        {},  # present, empty: nothing ambiguous
        {"m.0.1": ["m", "0", "1"]},  # a numeric field name (not an array index) below the top
        {"arr.0.0.0": ["arr", 0, 0, "0"]},  # array indexes as integers
        {"m.0.1": ["m", "0", "1"]},
        {"x.y": ["x.y"]},  # a field name holding a dot
    ]
    assert events[3]["updateDescription"]["updatedFields"] == {"m.0.1": "q"}
    assert events[4]["updateDescription"]["updatedFields"] == {"x.y": 1}
    assert all("disambiguatedPaths" not in e["updateDescription"] for e in plain_events)
    assert [e["updateDescription"]["updatedFields"] for e in plain_events] == [
        e["updateDescription"]["updatedFields"] for e in events
    ]


def test_operator_update_creating_a_sub_document_reports_it_whole(db: Database) -> None:
    db.c.insert_one({"_id": 1, "pad": PAD})
    with watch(db, show_expanded_events=True) as stream:
        db.c.update_one({"_id": 1}, {"$set": {"x.5": 1, "y.z.w": 2}})
        event = next_event(stream)
    assert event["updateDescription"]["updatedFields"] == {"x": {"5": 1}, "y": {"z": {"w": 2}}}
    assert event["updateDescription"]["disambiguatedPaths"] == {}
