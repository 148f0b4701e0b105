"""Conformance: numbers of every type in query filters and sorts.

MongoDB compares int, long, double and Decimal128 by value ("numeric types undergo conversion before
comparison", Comparison/Sort Order; the Decimal128 examples of the mongosh data-type docs: `{val: 10}`
finds 10, 10.0, NumberLong(10) and NumberDecimal("10"), while the double 9.99 is not the decimal
9.99). NaN equals NaN, lies inside no range, and sorts before every other number.
Runs against mongo_double, or a real MongoDB 7.0 replica set when MONGODB_URI is set.
"""

from __future__ import annotations

import decimal
import math
from typing import Any

import pymongo
import pytest
from bson import Decimal128, Int64
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

NAN = float("nan")
DOCS: list[dict[str, Any]] = [
    {"_id": 1, "val": 10, "kind": "int"},
    {"_id": 2, "val": Int64(10), "kind": "long"},
    {"_id": 3, "val": 10.0, "kind": "double"},
    {"_id": 4, "val": Decimal128("10"), "kind": "decimal"},
    {"_id": 5, "val": Decimal128("10.00"), "kind": "decimal"},
    {"_id": 6, "val": 9.99, "kind": "double"},
    {"_id": 7, "val": Decimal128("9.99"), "kind": "decimal"},
    {"_id": 8, "val": Decimal128("10.5"), "kind": "decimal"},
    {"_id": 9, "val": 11, "kind": "int"},
    {"_id": 10, "val": NAN, "kind": "double"},
    {"_id": 11, "val": Decimal128("NaN"), "kind": "decimal"},
    {"_id": 12, "val": "10", "kind": "string"},
    {"_id": 13, "val": [Decimal128("12"), 1], "kind": "array"},
    {"_id": 14, "val": Decimal128("-Infinity"), "kind": "decimal"},
]
TENS = [1, 2, 3, 4, 5]


@pytest.fixture(params=["scan", "index"])
def numbers(db: Database, request: pytest.FixtureRequest) -> Collection:
    """The documents above, without and with an index on `val` (an index lookup must find equal
    numbers of every type, as a scan does)."""
    coll = db["numbers"]
    if request.param == "index":
        coll.create_index("val")
    coll.insert_many(DOCS)
    return coll


def _ids(coll: Collection, query: dict[str, Any]) -> list[int]:
    return sorted(doc["_id"] for doc in coll.find(query))


@pytest.mark.parametrize(
    "value", [10, Int64(10), 10.0, Decimal128("10"), Decimal128("10.0"), Decimal128("1.0E+1")]
)
def test_equality_matches_every_number_of_the_same_value(numbers: Collection, value: Any) -> None:
    assert _ids(numbers, {"val": value}) == TENS
    assert _ids(numbers, {"val": {"$eq": value}}) == TENS
    assert numbers.count_documents({"val": value}) == len(TENS)


def test_double_and_decimal_of_the_same_literal_differ(numbers: Collection) -> None:
    # The double 9.99 is not exactly 9.99; the decimal is.
    assert _ids(numbers, {"val": 9.99}) == [6]
    assert _ids(numbers, {"val": Decimal128("9.99")}) == [7]
    assert _ids(numbers, {"val": Decimal128("9.990")}) == [7]


def test_ranges_compare_decimals_with_other_numbers(numbers: Collection) -> None:
    assert _ids(numbers, {"val": {"$gte": 10}}) == [*TENS, 8, 9, 13]
    assert _ids(numbers, {"val": {"$gt": 10}}) == [8, 9, 13]
    assert _ids(numbers, {"val": {"$lt": 10}}) == [6, 7, 13, 14]  # 13: its element 1
    assert _ids(numbers, {"val": {"$lte": Decimal128("9.99")}}) == [7, 13, 14]
    # Each bound may be met by another element of an array: 13 holds 12 and 1.
    assert _ids(numbers, {"val": {"$gt": 10.25, "$lt": Decimal128("11")}}) == [8, 13]
    assert _ids(numbers, {"val": {"$gte": Decimal128("11.5"), "$lte": Int64(12)}}) == [13]
    # Type bracketing: a number bound never matches the string "10", nor a string bound a number.
    assert _ids(numbers, {"val": {"$gt": "1"}}) == [12]


def test_in_and_nin_with_mixed_number_types(numbers: Collection) -> None:
    assert _ids(numbers, {"val": {"$in": [Decimal128("11"), 10.5]}}) == [8, 9]
    assert _ids(numbers, {"val": {"$in": [Int64(12), "nothing"]}}) == [13]
    assert _ids(numbers, {"val": {"$nin": [10, 9.99, NAN]}}) == [7, 8, 9, 12, 13, 14]
    assert _ids(numbers, {"val": {"$ne": Decimal128("10")}}) == [6, 7, 8, 9, 10, 11, 12, 13, 14]


def test_nan_equals_nan_and_is_in_no_range(numbers: Collection) -> None:
    assert _ids(numbers, {"val": NAN}) == [10, 11]
    assert _ids(numbers, {"val": Decimal128("NaN")}) == [10, 11]
    assert _ids(numbers, {"val": {"$in": [NAN]}}) == [10, 11]
    assert _ids(numbers, {"val": {"$gte": NAN}}) == [10, 11]
    assert _ids(numbers, {"val": {"$lte": Decimal128("NaN")}}) == [10, 11]
    assert _ids(numbers, {"val": {"$gt": NAN}}) == []
    assert _ids(numbers, {"val": {"$lt": NAN}}) == []
    assert 10 not in _ids(numbers, {"val": {"$lt": 0}})
    assert 11 not in _ids(numbers, {"val": {"$gt": -math.inf}})


def test_type_still_tells_the_number_types_apart(numbers: Collection) -> None:
    assert _ids(numbers, {"val": {"$type": "decimal"}}) == [4, 5, 7, 8, 11, 13, 14]
    assert _ids(numbers, {"val": {"$type": "double"}}) == [3, 6, 10]
    assert _ids(numbers, {"val": 10, "kind": "decimal"}) == [4, 5]


def test_sort_orders_numbers_by_value_across_types(numbers: Collection) -> None:
    docs = list(numbers.find({"_id": {"$ne": 13}}, sort=[("val", 1), ("_id", 1)]))
    # NaNs first, then the numbers by value (equal values by _id; the double 9.99 is a little more
    # than the decimal 9.99), then the string.
    assert [d["_id"] for d in docs] == [10, 11, 14, 7, 6, 1, 2, 3, 4, 5, 8, 9, 12]
    desc = list(
        numbers.find({"val": {"$type": "number"}, "_id": {"$ne": 13}}, sort=[("val", -1), ("_id", 1)])
    )
    assert [d["_id"] for d in desc] == [9, 8, 1, 2, 3, 4, 5, 6, 7, 14, 10, 11]


def test_sort_with_skip_and_limit(numbers: Collection) -> None:
    docs = list(numbers.find({"val": {"$gte": 9}}, sort=[("val", -1), ("_id", -1)], skip=1, limit=3))
    assert [d["_id"] for d in docs] == [9, 8, 5]


def test_writes_select_documents_by_value(numbers: Collection) -> None:
    result = numbers.update_many({"val": Decimal128("10")}, {"$set": {"hit": True}})
    assert (result.matched_count, result.modified_count) == (len(TENS), len(TENS))
    assert _ids(numbers, {"hit": True}) == TENS
    found = numbers.find_one_and_update(
        {"val": {"$gt": 10, "$lt": 11}},
        {"$set": {"hit": "range"}},
        return_document=pymongo.ReturnDocument.AFTER,
    )
    assert found is not None and found["_id"] == 8 and found["hit"] == "range"
    first = numbers.find_one_and_delete(
        {"val": {"$lte": 10}, "_id": {"$ne": 13}}, sort=[("val", -1), ("_id", 1)]
    )
    assert first is not None and first["_id"] == 1
    # The four tens left and the decimal 9.99.
    assert numbers.delete_many({"val": {"$in": [10.0, Decimal128("9.99")]}}).deleted_count == 5
    assert _ids(numbers, {"val": {"$type": "number"}}) == [6, 8, 9, 10, 11, 13, 14]


def test_upsert_finds_the_stored_number_of_another_type(numbers: Collection) -> None:
    result = numbers.update_one({"val": Decimal128("11.0")}, {"$set": {"hit": 1}}, upsert=True)
    assert result.upserted_id is None and result.matched_count == 1
    assert numbers.find_one({"hit": 1})["_id"] == 9


def test_distinct_counts_equal_numbers_once(numbers: Collection) -> None:
    values = numbers.distinct("val", {"_id": {"$in": [*TENS, 9, 6, 7]}})
    as_decimals = sorted(
        decimal.Decimal(str(v.to_decimal() if isinstance(v, Decimal128) else v)) for v in values
    )
    assert as_decimals == [decimal.Decimal("9.99"), decimal.Decimal("9.99"), 10, 11]
    assert len(numbers.distinct("val", {"val": {"$in": [10]}})) == 1


def test_unique_index_treats_equal_numbers_as_duplicates(db: Database) -> None:
    coll = db["unique_numbers"]
    coll.create_index("n", unique=True)
    coll.insert_one({"_id": 1, "n": 10})
    for duplicate in (10.0, Int64(10), Decimal128("10"), Decimal128("10.000")):
        with pytest.raises(DuplicateKeyError):
            coll.insert_one({"n": duplicate})
    coll.insert_one({"_id": 2, "n": Decimal128("10.5")})
    with pytest.raises(DuplicateKeyError):
        coll.update_one({"_id": 2}, {"$set": {"n": 10.0}})
    assert coll.count_documents({}) == 2


def test_transactions_compare_numbers_by_value(
    mongo_client: pymongo.MongoClient, numbers: Collection
) -> None:
    with mongo_client.start_session() as session, session.start_transaction():
        assert sorted(d["_id"] for d in numbers.find({"val": 10}, session=session)) == TENS
        assert numbers.count_documents({"val": {"$gt": Decimal128("10.25")}}, session=session) == 3
        numbers.update_one({"val": Decimal128("11")}, {"$set": {"in_txn": True}}, session=session)
    assert _ids(numbers, {"in_txn": True}) == [9]
