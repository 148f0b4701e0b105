"""A route's `match` decides the same on the server (the change stream's $match) and in the listener.

For each case the events are produced by real writes; one change stream carries the compiled $match
(what the listener sends), another carries everything. Every event the server delivers through the
$match must be one that `tasks_for` routes, and every routed event must be delivered. Runs against a
real MongoDB replica set when MONGODB_URI is set (tests/conftest.py).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import pytest
from bson import Decimal128, Int64, Regex
from pymongo.collection import Collection
from pymongo.database import Database

from changeflow.listener.routes import Route, compile_match, tasks_for
from tests.mongo_double.helpers import next_event

Write = Callable[[Collection], object]
OPS = ["insert", "update", "replace", "delete"]
SENTINEL = "match_agreement_sentinel"
AT = datetime.datetime(2026, 1, 2, 3, 4, 5)


def inserts(*documents: dict[str, Any]) -> list[Write]:
    return [lambda c, d=d: c.insert_one(dict(d)) for d in documents]


def updates(*changes: dict[str, Any]) -> list[Write]:
    """One document per change, inserted then updated with `change` (an update operator document)."""
    writes: list[Write] = []
    for i, change in enumerate(changes):
        writes.append(lambda c, i=i: c.insert_one({"_id": f"u{i}", "status": "new", "n": 1}))
        writes.append(lambda c, i=i, change=change: c.update_one({"_id": f"u{i}"}, change))
    return writes


# name -> (query on the change event, the writes producing the events)
CASES: dict[str, tuple[dict[str, Any], list[Write]]] = {
    "equality": (
        {"fullDocument.status": "active"},
        inserts(
            {"status": "active"}, {"status": "inactive"}, {}, {"status": ["active", "x"]}, {"status": None}
        ),
    ),
    "gte on numbers of different types": (
        {"fullDocument.total": {"$gte": 1000}},
        inserts(
            {"total": 1000},
            {"total": 1000.0},
            {"total": Int64(999)},
            {"total": Int64(5000)},
            {"total": 999.99},
            {"total": "1000"},
            {"total": None},
            {},
            {"total": [5, 2000]},
        ),
    ),
    "lt on numbers of different types": (
        {"fullDocument.total": {"$lt": 10}},
        inserts(
            {"total": 9},
            {"total": 9.5},
            {"total": Int64(-3)},
            {"total": "5"},
            {"total": None},
            {},
            {"total": True},
        ),
    ),
    "decimal128 against int and float bounds": (
        {"$or": [{"fullDocument.total": {"$gte": 1000}}, {"fullDocument.total": {"$lt": 9.5}}]},
        inserts(
            {"total": Decimal128("1000.5")},
            {"total": Decimal128("999.99")},
            {"total": Decimal128("1000")},
            {"total": Decimal128("9.4")},
            {"total": Decimal128("9.5")},
            {"total": Decimal128("NaN")},
        ),
    ),
    "decimal128 equality with an int": (
        {"fullDocument.total": 10},
        inserts({"total": Decimal128("10.0")}, {"total": Decimal128("10.5")}, {"total": 10.0}),
    ),
    "in, with null": (
        {"fullDocument.tag": {"$in": ["a", "b", None]}},
        inserts({"tag": "a"}, {"tag": "c"}, {}, {"tag": ["c", "b"]}, {"tag": None}, {"tag": ["c"]}),
    ),
    "exists on updated fields": (
        {"updateDescription.updatedFields.status": {"$exists": True}},
        updates(
            {"$set": {"status": "paid"}},
            {"$set": {"n": 2}},
            {"$unset": {"status": ""}},
            {"$set": {"status": None}},
            {"$set": {"meta.code": 3}},
        ),
    ),
    "exists false": (
        {"fullDocument.note": {"$exists": False}},
        inserts({"note": "x"}, {}, {"note": None}),
    ),
    "array: equality to an element": (
        {"fullDocument.tags": "vip"},
        inserts({"tags": ["vip", "x"]}, {"tags": "vip"}, {"tags": ["x"]}, {"tags": [["vip"]]}, {"tags": []}),
    ),
    "array: equality to the whole array": (
        {"fullDocument.tags": ["vip", "x"]},
        inserts({"tags": ["vip", "x"]}, {"tags": ["x", "vip"]}, {"tags": [["vip", "x"]]}, {"tags": "vip"}),
    ),
    "dotted path into an array of documents": (
        {"fullDocument.items.sku": "x"},
        inserts(
            {"items": [{"sku": "y"}, {"sku": "x"}]},
            {"items": [{"sku": "y"}]},
            {"items": {"sku": "x"}},
            {"items": []},
            {"items": [{"sku": ["x"]}]},
            {},
        ),
    ),
    "positional path": (
        {"fullDocument.items.0.sku": "x"},
        inserts(
            {"items": [{"sku": "x"}, {"sku": "y"}]}, {"items": [{"sku": "y"}, {"sku": "x"}]}, {"items": []}
        ),
    ),
    "null matches missing": (
        {"fullDocument.note": None},
        inserts({"note": None}, {}, {"note": "x"}, {"note": [None, 1]}),
    ),
    "ne null": (
        {"fullDocument.note": {"$ne": None}},
        inserts({"note": None}, {}, {"note": "x"}, {"note": [1, 2]}),
    ),
    "nested document equality (field order counts)": (
        {"fullDocument.address": {"city": "Oslo", "zip": "1"}},
        inserts(
            {"address": {"city": "Oslo", "zip": "1"}},
            {"address": {"zip": "1", "city": "Oslo"}},
            {"address": {"city": "Oslo"}},
            {"address": [{"city": "Oslo", "zip": "1"}]},
        ),
    ),
    "nested field": (
        {"fullDocument.address.city": "Oslo"},
        inserts(
            {"address": {"city": "Oslo", "zip": "1"}}, {"address": {"city": "Bergen"}}, {"address": "Oslo"}
        ),
    ),
    "and / or": (
        {
            "$and": [
                {"fullDocument.a": {"$gte": 1}},
                {"$or": [{"fullDocument.b": "x"}, {"fullDocument.c": True}]},
            ]
        },
        inserts({"a": 1, "b": "x"}, {"a": 1, "c": True}, {"a": 0, "b": "x"}, {"a": 2}, {"b": "x", "c": True}),
    ),
    "nor": (
        {"$nor": [{"fullDocument.a": 1}, {"fullDocument.b": {"$exists": True}}]},
        inserts({"a": 1}, {"a": 2}, {"b": None}, {}),
    ),
    "not": (
        {"fullDocument.a": {"$not": {"$gt": 1}}},
        inserts({"a": 1}, {"a": 3}, {}, {"a": "z"}, {"a": [0, 5]}),
    ),
    "regex": (
        {"fullDocument.name": {"$regex": "^ad", "$options": "i"}},
        inserts({"name": "Ada"}, {"name": "bad"}, {"name": ["x", "adam"]}, {"name": 5}, {}),
    ),
    "regex object": (
        {"fullDocument.name": Regex("a$")},
        inserts({"name": "Ada"}, {"name": "Ana b"}),
    ),
    "dates": (
        {"fullDocument.at": {"$gte": AT}},
        inserts({"at": AT}, {"at": AT - datetime.timedelta(seconds=1)}, {"at": AT.isoformat()}),
    ),
    "operation type and document key": (
        {"$or": [{"operationType": "delete"}, {"documentKey._id": "u1"}]},
        [*updates({"$set": {"n": 2}}, {"$set": {"n": 3}}), lambda c: c.delete_one({"_id": "u0"})],
    ),
}


def read_until_sentinel(stream: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        event = next_event(stream)
        if (event.get("ns") or {}).get("coll") == SENTINEL:
            return events
        events.append(event)


@pytest.mark.parametrize("case", sorted(CASES))
def test_listener_routing_agrees_with_the_servers_match(db: Database, case: str) -> None:
    query, writes = CASES[case]
    routes = [
        Route("docs", OPS, ["tasks.matched"], match_query=query),
        Route(SENTINEL, ["insert"], ["tasks.sentinel"]),
    ]
    options = {"max_await_time_ms": 100}
    with (
        db.watch([{"$match": compile_match(routes)}], **options) as filtered,
        db.watch(**options) as everything,
    ):
        for write in writes:
            write(db.docs)
        db[SENTINEL].insert_one({})
        all_events = read_until_sentinel(everything)
        delivered = read_until_sentinel(filtered)
    assert len(all_events) >= len(writes)
    routed = [e["_id"] for e in all_events if tasks_for(e, routes) == ["tasks.matched"]]
    assert [e["_id"] for e in delivered] == routed
    # Each case must tell events apart: some pass, some do not.
    assert 0 < len(routed) < len(all_events), f"{case}: {len(routed)} of {len(all_events)} events routed"
