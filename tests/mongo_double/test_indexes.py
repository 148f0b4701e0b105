"""The test server's indexes answer exactly as a scan does (same documents, same order, same
errors), and equality lookups on `_id` and indexed fields test only the documents that can match.

In-process: the same operations run on a collection that scans for every query (the server's matcher,
numbers of every type compared by value, without the index lookups) and on an indexed one.
"""

from __future__ import annotations

import datetime
import random
from typing import Any

import mongomock
import mongomock.collection
import mongomock.results
import pymongo.errors
import pytest
from bson import Decimal128, Int64, ObjectId
from mongomock import filtering

from changeflow.testing.mongo_double import indexes, numeric

VALUES: list[Any] = [
    1, 2, 1.0, 2.5, True, False, 0, "a", "b", "", None,
    [1, 2], [2, "a"], [], [[1]], [{"b": 1}], {"b": 1}, {"b": [1, 2]}, {"c": 1},
    Decimal128("1"), datetime.datetime(2026, 1, 1), ObjectId("000000000000000000000001"),
    Decimal128("2.50"), Decimal128("-0"), [Decimal128("2"), 3], {"b": Decimal128("1.0")}, Int64(2),
]  # fmt: skip
FILTERS: list[dict[str, Any]] = [
    {"a": 1}, {"a": 1.0}, {"a": True}, {"a": "a"}, {"a": {"$eq": 2}}, {"a": {"$in": [1, "b", 2.5]}},
    {"a": {"$in": []}}, {"a": None}, {"a": [1, 2]}, {"a": {"b": 1}}, {"a": {"$gt": 0}},
    {"a.b": 1}, {"a.b": 2}, {"a.0": 1}, {"a": 1, "k": 3}, {"$and": [{"a": 2}, {"k": {"$lt": 5}}]},
    {"_id": 3}, {"_id": {"$in": [7, 3, 11, 200]}}, {"_id": 3.0}, {"_id": {"$eq": 5}, "a": 1},
    {"$and": [{"a": 1}, {"_id": 4}]}, {"$or": [{"a": 1}, {"_id": 4}]}, {"u": 5}, {"u": {"$in": [1, 2]}},
    {"k": 4}, {}, {"a": Decimal128("1")}, {"a": Decimal128("2.5")}, {"a": 0.0}, {"a": Int64(1)},
    {"a": {"$in": [Decimal128("2"), 2.5]}}, {"a": {"$gte": Decimal128("1")}}, {"a.b": Decimal128("1.00")},
    {"_id": Decimal128("3")}, {"_id": {"$in": [Decimal128("4"), 5.0]}}, {"u": Decimal128("5")},
]  # fmt: skip


class _ScanningStore(indexes.IndexedCollectionStore):
    """The reference: the server's matcher on every document, never an index lookup."""

    def candidates(self, query: Any) -> list[Any] | None:
        return None


class _ScanningDatabase(indexes.IndexedDatabaseStore):
    collection_class = _ScanningStore


class _ScanningServer(indexes.IndexedServerStore):
    database_class = _ScanningDatabase


def _collections() -> tuple[mongomock.Collection, mongomock.Collection]:
    plain = mongomock.MongoClient(_store=_ScanningServer())["d"]["c"]
    indexed = indexes.indexed_client()["d"]["c"]
    for c in (plain, indexed):
        c.create_index("u", unique=True, sparse=True)
        c.create_index("a")
        c.create_index("a.b")
    return plain, indexed


def _outcome(result: Any) -> Any:
    if isinstance(result, mongomock.results.InsertOneResult):
        return result.inserted_id
    if isinstance(result, mongomock.results.UpdateResult):
        return result.matched_count, result.modified_count, result.upserted_id
    if isinstance(result, mongomock.results.DeleteResult):
        return result.deleted_count
    return result if isinstance(result, int) else list(result)


def _same(plain: mongomock.Collection, indexed: mongomock.Collection, op: str, *args: Any) -> Any:
    """Run op on both; the results (or the error types) must be the same."""
    outcomes = []
    for c in (plain, indexed):
        try:
            result = getattr(c, op)(*args)
            outcomes.append(("ok", _outcome(result)))
        except (pymongo.errors.PyMongoError, ValueError, TypeError, NotImplementedError) as exc:
            outcomes.append(("error", type(exc).__name__))
    assert outcomes[0] == outcomes[1], (op, args)
    return outcomes[1]


@pytest.mark.parametrize("seed", range(6))
def test_indexed_collections_answer_as_a_scan_does(seed: int) -> None:
    rng = random.Random(seed)
    plain, indexed = _collections()
    for _ in range(400):
        kind = rng.random()
        _id = rng.randrange(40)
        if kind < 0.35:
            doc = {"_id": _id, "a": rng.choice(VALUES), "k": rng.randrange(8)}
            if rng.random() < 0.5:
                doc["u"] = rng.randrange(30)
            _same(plain, indexed, "insert_one", doc)
        elif kind < 0.6:
            update = {
                "$set": {rng.choice(["a", "a.b", "u", "k"]): rng.choice([*VALUES[:8], rng.randrange(30)])}
            }
            _same(plain, indexed, "update_one", rng.choice(FILTERS[:20]), update)
        elif kind < 0.7:
            _same(
                plain, indexed, "replace_one", {"_id": _id}, {"a": rng.choice(VALUES), "u": rng.randrange(30)}
            )
        elif kind < 0.8:
            _same(plain, indexed, "delete_one", rng.choice(FILTERS))
        elif kind < 0.85:
            _same(plain, indexed, "update_many", {"k": rng.randrange(8)}, {"$inc": {"k": 1}})
        elif kind < 0.87:
            _same(plain, indexed, "update_one", {"_id": _id}, {"$set": {"u": 1}}, True)
        for query in rng.sample(FILTERS, 4):
            _same(plain, indexed, "find", query)
            _same(plain, indexed, "count_documents", query)
    for query in FILTERS:
        _same(plain, indexed, "find", query)


def test_index_changes_are_followed() -> None:
    """Indexes created on a filled collection, dropped (one, all), a dropped and a renamed collection."""
    plain, indexed = _collections()
    for c in (plain, indexed):
        c.insert_many([{"_id": i, "a": i % 3, "e": f"x{i % 5}", "u": i} for i in range(30)])
        c.create_index("e")
    for query in ({"e": "x1"}, {"a": 2}, {"u": 7}, {"e": {"$in": ["x2", "x0"]}, "a": 1}):
        _same(plain, indexed, "find", query)
    _same(plain, indexed, "insert_one", {"_id": 99, "u": 7})  # unique on u: both refuse it
    for c in (plain, indexed):
        c.drop_index("a_1")
        c.update_many({"a": 1}, {"$set": {"a": 5}})
    _same(plain, indexed, "find", {"a": 5})
    for c in (plain, indexed):
        c.drop_indexes()
    _same(plain, indexed, "insert_one", {"_id": 99, "u": 7})  # no unique index any more
    _same(plain, indexed, "find", {"u": 7})
    for c in (plain, indexed):
        c.database.rename_collection("c", "r")
    _same(plain.database["r"], indexed.database["r"], "find", {"_id": 99})
    for c in (plain, indexed):
        c.database["r"].drop()
        c.database["r"].insert_one({"_id": 1, "a": 1})
    _same(plain.database["r"], indexed.database["r"], "find", {"_id": {"$in": [1, 99]}})


def test_equality_lookups_test_only_the_documents_that_can_match(monkeypatch: pytest.MonkeyPatch) -> None:
    c = indexes.indexed_client()["d"]["big"]
    c.create_index("email", unique=True)
    c.insert_many([{"_id": i, "email": f"u{i}", "plan": "free"} for i in range(2000)])
    tested = []
    original = filtering.filter_applies

    def counting(query: Any, doc: Any, *args: Any) -> bool:
        tested.append(doc.get("_id"))
        return original(query, doc, *args)

    monkeypatch.setattr(numeric, "filter_applies", counting)  # what lookups and scans call
    assert c.find_one({"_id": 1234})["email"] == "u1234"
    assert c.find_one({"email": "u17"})["_id"] == 17
    c.update_one({"_id": 5}, {"$set": {"email": "five"}})  # the unique check looks up "five" only
    c.insert_one({"_id": 2000, "email": "new"})
    assert c.count_documents({"_id": {"$in": [3, 2000, 7]}}) == 3
    assert c.find_one({"email": "u5"}) is None and c.find_one({"email": "five"})["_id"] == 5
    assert len(tested) < 30, tested
