"""listener.matching: the one place reaching into mongomock's query matcher (not its documented API).

If a mongomock upgrade moves or changes `mongomock.filtering.filter_applies`, these fail first.
The agreement with a server's $match is tested in tests/mongo_double/test_match_agreement.py.
"""

from __future__ import annotations

import pytest
from bson import Decimal128

from changeflow.listener.matching import check_query, query_matches


def test_the_matcher_is_where_listener_matching_expects_it() -> None:
    from mongomock import filtering

    message = "mongomock.filtering.filter_applies moved: see changeflow/listener/matching.py"
    assert callable(filtering.filter_applies), message


@pytest.mark.parametrize(
    ("query", "event", "expected"),
    [
        ({"fullDocument.total": {"$gte": 1000}}, {"fullDocument": {"total": 1000.0}}, True),
        ({"fullDocument.total": {"$gte": 1000}}, {"fullDocument": {"total": 999}}, False),
        ({"fullDocument.tags": "vip"}, {"fullDocument": {"tags": ["a", "vip"]}}, True),
        ({"fullDocument.items.sku": "x"}, {"fullDocument": {"items": [{"sku": "y"}, {"sku": "x"}]}}, True),
        ({"fullDocument.note": None}, {"fullDocument": {}}, True),
        ({"fullDocument.note": {"$exists": False}}, {"fullDocument": {"note": None}}, False),
        ({"$or": [{"a": 1}, {"b": 2}]}, {"b": 2}, True),
        ({"a": {"$not": {"$gt": 1}}}, {"a": 3}, False),
        ({"name": {"$regex": "^ad", "$options": "i"}}, {"name": "Ada"}, True),
        # Decimal128 compares with other numbers by value, as on MongoDB (mongomock alone cannot).
        ({"t": {"$gte": 1000}}, {"t": Decimal128("1000.5")}, True),
        ({"t": {"$gte": 1000}}, {"t": Decimal128("999.99")}, False),
        ({"t": {"$lt": 9.5}}, {"t": Decimal128("9.4")}, True),
        ({"t": 10}, {"t": Decimal128("10.0")}, True),
        ({"t": Decimal128("10")}, {"t": 10.0}, True),
        ({"t": {"$gte": 0}}, {"t": Decimal128("NaN")}, False),
        ({"t": {"$in": [Decimal128("1.5")]}}, {"t": [3, 1.5]}, True),
    ],
)
def test_query_matches_as_mongodb_does(query: dict, event: dict, expected: bool) -> None:
    assert query_matches(query, event) is expected


@pytest.mark.parametrize(
    "query", [{}, {"a": {"$bogus": 1}}, {"a": {"$in": 3}}, {"a": 1, "b": {"$bogus": 2}}, {"$where": "1"}]
)
def test_queries_the_listener_cannot_evaluate_are_refused(query: dict) -> None:
    with pytest.raises(ValueError):
        check_query(query)
