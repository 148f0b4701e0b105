"""A change stream's pipeline as mongod 7.0 checks and evaluates it: stage validation, numbers across
types in `$match`, and `$expr` (`$mod`, `$abs`, `$eq`, `$toHashedIndexKey`, paths into documentKey).

Written to what MongoDB documents, so they also hold against a real mongod 7.0 (MONGODB_URI).
"""

from __future__ import annotations

from typing import Any

import pytest
from bson import Decimal128, Int64
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import OperationFailure

from changeflow.testing.mongo_double.hashing import MISSING, to_hashed_index_key
from tests.mongo_double.helpers import next_event

AWAIT_MS = 200
SENTINEL = "sentinel"


def delivered(coll: Collection, pipeline: list[dict[str, Any]], documents: list[dict[str, Any]]) -> list[Any]:
    """The _ids of the inserted documents whose events pass `pipeline` (a sentinel marks the end)."""
    pipeline = [{"$match": {"$or": [{"fullDocument._id": SENTINEL}, *_and(pipeline)]}}, *pipeline[1:]]
    with coll.watch(pipeline, max_await_time_ms=AWAIT_MS) as stream:
        coll.insert_many(documents)
        coll.insert_one({"_id": SENTINEL})
        ids = []
        while True:
            event = next_event(stream)
            if event["documentKey"]["_id"] == SENTINEL:
                return ids
            ids.append(event["documentKey"]["_id"])


def _and(pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [pipeline[0]["$match"]]


# --------------------------------------------------------------------------------------------
# Stage validation


@pytest.mark.parametrize(
    ("pipeline", "code"),
    [
        ([{"$nosuchstage": {}}], 40324),  # unrecognized stage name
        ([{"nodollar": {}}], 40324),
        ([{"$group": {"_id": None}}], 20),  # a stage that exists, not allowed in a change stream
        ([{"$sort": {"_id": 1}}], 20),
        ([{"$lookup": {"from": "x", "localField": "a", "foreignField": "b", "as": "c"}}], 20),
        ([{"$changeStreamSplitLargeEvent": {}}, {"$match": {}}], 7182802),  # must be last
        ([{"$changeStreamSplitLargeEvent": {"x": 1}}], 7182800),
    ],
)
def test_invalid_stages_fail_with_mongods_codes(
    db: Database, pipeline: list[dict[str, Any]], code: int
) -> None:
    with pytest.raises(OperationFailure) as failure:
        db.c.watch(pipeline)
    assert failure.value.code == code


def test_unrecognized_stage_wins_over_a_stage_not_allowed(db: Database) -> None:
    # mongod parses the whole pipeline before it checks what a change stream allows.
    with pytest.raises(OperationFailure) as failure:
        db.c.watch([{"$group": {"_id": None}}, {"$nosuchstage": {}}])
    assert failure.value.code == 40324
    assert "$nosuchstage" in str(failure.value)


def test_not_allowed_message_names_the_stage(db: Database) -> None:
    with pytest.raises(OperationFailure) as failure:
        db.c.watch([{"$group": {"_id": None}}])
    assert failure.value.code == 20
    assert "$group is not permitted in a $changeStream pipeline" in str(failure.value)


def test_split_stage_accepted_last(db: Database) -> None:
    with db.c.watch(
        [{"$match": {}}, {"$changeStreamSplitLargeEvent": {}}], max_await_time_ms=AWAIT_MS
    ) as stream:
        db.c.insert_one({"_id": 1})
        assert next_event(stream)["documentKey"] == {"_id": 1}


# --------------------------------------------------------------------------------------------
# Numbers across types


def test_decimal128_amounts_compare_by_value_with_gte_and_lt(db: Database) -> None:
    documents = [
        {"_id": "d100", "total": Decimal128("100.00")},
        {"_id": "d99", "total": Decimal128("99.99")},
        {"_id": "i150", "total": 150},
        {"_id": "l500", "total": Int64(500)},
        {"_id": "f100", "total": 100.0},
        {"_id": "d500", "total": Decimal128("500")},
        {"_id": "nan", "total": Decimal128("NaN")},
        {"_id": "s", "total": "120"},
    ]
    query = {"fullDocument.total": {"$gte": Decimal128("100"), "$lt": 500}}
    assert delivered(db.orders, [{"$match": query}], documents) == ["d100", "i150", "f100"]


def test_int_bound_matches_decimal_and_double_equal_values(db: Database) -> None:
    documents = [{"_id": 1, "n": Decimal128("7.0")}, {"_id": 2, "n": 7.0}, {"_id": 3, "n": Decimal128("7.5")}]
    assert delivered(db.c, [{"$match": {"fullDocument.n": 7}}], documents) == [1, 2]


def test_decimal128_in_a_match_with_other_stages(db: Database) -> None:
    documents = [{"_id": 1, "n": Decimal128("2.5")}, {"_id": 2, "n": 1}]
    pipeline = [{"$match": {"fullDocument.n": {"$gt": 2}}}, {"$addFields": {"seen": True}}]
    assert delivered(db.c, pipeline, documents) == [1]


# --------------------------------------------------------------------------------------------
# $expr


def test_expr_mod_and_abs_on_document_key(db: Database) -> None:
    documents = [{"_id": n} for n in (-7, -4, 1, 4, 5, 8)]
    # $mod takes the dividend's sign: -7 % 4 is -3, |-3| is 3.
    query = {"$expr": {"$eq": [{"$abs": {"$mod": ["$documentKey._id", 4]}}, 3]}}
    assert delivered(db.c, [{"$match": query}], documents) == [-7]
    query = {"$expr": {"$eq": [{"$mod": ["$documentKey._id", 4]}, 0]}}
    assert delivered(db.c2, [{"$match": query}], documents) == [-4, 4, 8]


def test_expr_missing_field_is_not_null(db: Database) -> None:
    documents = [{"_id": 1, "a": None}, {"_id": 2}]
    query = {"$expr": {"$eq": ["$fullDocument.a", None]}}
    assert delivered(db.c, [{"$match": query}], documents) == [1]


def test_expr_mod_of_a_missing_field_is_null(db: Database) -> None:
    documents = [{"_id": 1, "n": 3}, {"_id": 2}]
    query = {"$expr": {"$eq": [{"$mod": ["$fullDocument.n", 2]}, None]}}
    assert delivered(db.c, [{"$match": query}], documents) == [2]


def test_expr_compares_numbers_of_any_type_by_value(db: Database) -> None:
    documents = [
        {"_id": 1, "n": Decimal128("3")},
        {"_id": 2, "n": Int64(3)},
        {"_id": 3, "n": 3.5},
        {"_id": 4, "n": True},
    ]
    query = {"$expr": {"$eq": ["$fullDocument.n", 3]}}
    assert delivered(db.c, [{"$match": query}], documents) == [1, 2]


def test_expr_inside_or_with_a_query_clause(db: Database) -> None:
    documents = [{"_id": 1, "s": "x"}, {"_id": 2, "s": "y"}, {"_id": 3, "s": "y"}]
    query = {"$or": [{"fullDocument.s": "x"}, {"$expr": {"$eq": ["$documentKey._id", 3]}}]}
    assert delivered(db.c, [{"$match": query}], documents) == [1, 3]


def test_to_hashed_index_key_splits_events_into_shares(db: Database) -> None:
    """Each of N listeners takes the events whose hashed _id mod N is its share: every event lands in
    exactly one share, and the share agrees with the hashed index function computed client-side."""
    documents = [{"_id": n} for n in range(12)] + [{"_id": f"k{n}"} for n in range(4)]
    shares = []
    for share in range(3):
        query = {
            "$expr": {"$eq": [{"$abs": {"$mod": [{"$toHashedIndexKey": "$documentKey._id"}, 3]}}, share]}
        }
        shares.append(delivered(db[f"c{share}"], [{"$match": query}], documents))
    assert sorted(str(_id) for ids in shares for _id in ids) == sorted(str(d["_id"]) for d in documents)
    for share, ids in enumerate(shares):
        for _id in ids:
            assert abs(_c_mod(to_hashed_index_key(_id), 3)) == share


def _c_mod(a: int, b: int) -> int:
    return -(-a % b) if a < 0 else a % b


def test_to_hashed_index_key_matches_the_documented_value(db: Database) -> None:
    # MongoDB's $toHashedIndexKey reference: "string to hash" -> Long("763543691661428748").
    query = {"$expr": {"$eq": [{"$toHashedIndexKey": "$fullDocument.val"}, Int64(763543691661428748)]}}
    documents = [{"_id": 1, "val": "string to hash"}, {"_id": 2, "val": "other"}]
    assert delivered(db.c, [{"$match": query}], documents) == [1]


def test_hashed_index_key_vectors() -> None:
    # The documented example, and the check mongod runs at start-up (hasher.cpp: {check: 42}).
    assert to_hashed_index_key("string to hash") == 763543691661428748
    assert to_hashed_index_key(42) == -944302157085130861
    # Numbers hash as their int64 value, whatever their type.
    assert (
        to_hashed_index_key(42.9) == to_hashed_index_key(Int64(42)) == to_hashed_index_key(Decimal128("42"))
    )
    assert to_hashed_index_key(None) != to_hashed_index_key(MISSING)
