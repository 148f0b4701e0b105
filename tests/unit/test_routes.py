"""Routing: which tasks an event triggers, and the server-side $match that must agree with it."""

from __future__ import annotations

from typing import Any

import mongomock
import pytest

from changeflow.listener.routes import FieldChanged, Route, compile_match, tasks_for
from worker import app as repo_app

# This repository's app (tasks/, declared with @app.on): the card's routes. Their order follows the
# modules' discovery order, so the card's assertions below compare sets of tasks.
ROUTES = repo_app.routes


def event(coll: str, op: str, **fields: Any) -> dict[str, Any]:
    return {"_id": {"_data": "82AB"}, "operationType": op, "ns": {"db": "app", "coll": coll}, **fields}


def update(coll: str, updated: dict[str, Any], removed: list[str] | None = None) -> dict[str, Any]:
    description = {"updatedFields": updated, "removedFields": removed or [], "truncatedArrays": []}
    return event(coll, "update", documentKey={"_id": 1}, updateDescription=description)


def test_user_insert_sends_welcome_email_creates_profile_logs_and_stores_it() -> None:
    names = tasks_for(event("users", "insert", fullDocument={"_id": 1}), ROUTES)
    assert sorted(names) == [
        "tasks.append_event",
        "tasks.create_profile",
        "tasks.log_registration",
        "tasks.send_welcome_email",
    ]


def test_order_insert_updates_analytics_and_is_stored() -> None:
    names = tasks_for(event("orders", "insert", fullDocument={"_id": 1}), ROUTES)
    assert sorted(names) == ["tasks.append_event", "tasks.update_analytics"]


def test_order_status_change_notifies_updates_analytics_and_is_stored() -> None:
    names = tasks_for(update("orders", {"status": "shipped"}), ROUTES)
    assert sorted(names) == [
        "tasks.append_event",
        "tasks.send_shipping_notification",
        "tasks.update_analytics",
    ]


@pytest.mark.parametrize(
    "change",
    [
        update("users", {"status": "active"}),
        event("users", "replace", documentKey={"_id": 1}, fullDocument={"_id": 1}),
        event("users", "delete", documentKey={"_id": 1}),
    ],
)
def test_user_changes_invalidate_the_cache_and_are_stored(change: dict[str, Any]) -> None:
    assert sorted(tasks_for(change, ROUTES)) == ["tasks.append_event", "tasks.invalidate_user_cache"]


@pytest.mark.parametrize(
    "change",
    [
        update("orders", {"total": 10}),  # status untouched
        update("orders", {}, removed=["status"]),  # removing is not changing to a value
        update("orders", {"status.code": 3}),  # a sub-path is not the field itself
        event("orders", "delete", documentKey={"_id": 1}),
        event("orders", "replace", fullDocument={"_id": 1, "status": "new"}),
    ],
)
def test_other_order_changes_are_only_stored(change: dict[str, Any]) -> None:
    assert tasks_for(change, ROUTES) == ["tasks.append_event"]


@pytest.mark.parametrize(
    "change",
    [
        event("invoices", "insert", fullDocument={"_id": 1}),
        {"_id": {"_data": "82AC"}, "operationType": "invalidate"},
    ],
)
def test_unrouted_changes_trigger_nothing(change: dict[str, Any]) -> None:
    assert tasks_for(change, ROUTES) == []


def test_only_the_cache_route_asks_for_pre_images() -> None:
    assert [(r.collection, r.tasks) for r in ROUTES if r.pre_images] == [
        ("users", ("tasks.invalidate_user_cache",))
    ]
    with pytest.raises(ValueError, match="pre_images=True needs an operation that has a pre-image"):
        Route("users", ["insert"], ["tasks.a"], pre_images=True)
    assert hash(Route("users", ["delete"], ["tasks.a"], pre_images=True)) != hash(
        Route("users", ["delete"], ["tasks.a"])
    )


def test_tasks_keep_route_order_and_appear_once() -> None:
    routes = [
        Route("orders", ["update"], ["tasks.b", "tasks.a"], when=FieldChanged("status")),
        Route("orders", ["update", "insert"], ["tasks.a", "tasks.c"]),
    ]
    assert tasks_for(update("orders", {"status": 1}), routes) == ["tasks.b", "tasks.a", "tasks.c"]
    assert tasks_for(update("orders", {"total": 1}), routes) == ["tasks.a", "tasks.c"]


def test_field_changed_on_insert_means_the_document_has_the_field() -> None:
    routes = [Route("orders", ["insert", "update"], ["tasks.x"], when=FieldChanged("status"))]
    assert tasks_for(event("orders", "insert", fullDocument={"_id": 1, "status": None}), routes) == [
        "tasks.x"
    ]
    assert tasks_for(event("orders", "insert", fullDocument={"_id": 1}), routes) == []
    assert tasks_for(update("orders", {"status": "paid"}), routes) == ["tasks.x"]


def test_route_normalizes_sequences_to_tuples() -> None:
    route = Route("users", "insert", ["tasks.a"])
    assert route.operation_types == ("insert",)
    assert route.tasks == ("tasks.a",)
    assert hash(route) == hash(Route("users", ("insert",), ("tasks.a",)))


@pytest.mark.parametrize(
    ("args", "when"),
    [
        (("users", [], ["tasks.a"]), None),
        (("users", ["insert"], []), None),
        (("", ["insert"], ["tasks.a"]), None),
        (("users", ["delete"], ["tasks.a"]), FieldChanged("status")),  # deletes carry no fields
    ],
)
def test_invalid_routes_are_rejected_when_declared(args: tuple[Any, ...], when: FieldChanged | None) -> None:
    with pytest.raises(ValueError):
        Route(*args, when=when)


@pytest.mark.parametrize("field", ["", "status.code", "$status"])
def test_field_changed_takes_a_top_level_field(field: str) -> None:
    with pytest.raises(ValueError):
        FieldChanged(field)


def test_match_is_one_clause_per_route() -> None:
    status_changed = {
        "ns.coll": "orders",
        "operationType": {"$in": ["update"]},
        "updateDescription.updatedFields.status": {"$exists": True},
    }
    routes = [
        Route("users", ["insert"], ["tasks.a", "tasks.b"]),
        Route("orders", ["insert"], ["tasks.c"]),
        Route("orders", ["update"], ["tasks.d"], when=FieldChanged("status")),
    ]
    assert compile_match(routes) == {
        "$or": [
            {"ns.coll": "users", "operationType": {"$in": ["insert"]}},
            {"ns.coll": "orders", "operationType": {"$in": ["insert"]}},
            status_changed,
        ]
    }
    # The repository's app: one clause per declared route.
    clauses = compile_match(ROUTES)["$or"]
    every_change = {"$in": ["insert", "update", "replace", "delete"]}
    assert len(clauses) == len(ROUTES) == 10
    assert {repr(c) for c in clauses} == {
        repr({"ns.coll": "users", "operationType": {"$in": ["insert"]}}),
        repr({"ns.coll": "orders", "operationType": {"$in": ["insert"]}}),
        repr(status_changed),
        repr({"ns.coll": "posts", "operationType": {"$in": ["insert"]}}),
        repr({"ns.coll": "users", "operationType": {"$in": ["update", "replace", "delete"]}}),
        repr({"ns.coll": "users", "operationType": every_change}),
        repr({"ns.coll": "orders", "operationType": every_change}),
    }


def test_single_route_compiles_without_or() -> None:
    assert compile_match([Route("users", ["insert", "replace"], ["tasks.a"])]) == {
        "ns.coll": "users",
        "operationType": {"$in": ["insert", "replace"]},
    }


def test_no_routes_is_an_error() -> None:
    with pytest.raises(ValueError, match="no routes"):
        compile_match([])


SAMPLE_EVENTS: list[dict[str, Any]] = [
    event("users", "insert", documentKey={"_id": 1}, fullDocument={"_id": 1, "email": "a@example.com"}),
    event("users", "insert", documentKey={"_id": 2}, fullDocument={"_id": 2, "status": "new"}),
    event("users", "delete", documentKey={"_id": 1}),
    event("users", "replace", documentKey={"_id": 2}, fullDocument={"_id": 2, "status": "x"}),
    update("users", {"email": "b@example.com"}),
    update("users", {"status": "active"}),
    event("orders", "insert", documentKey={"_id": 3}, fullDocument={"_id": 3, "status": "new"}),
    event("orders", "insert", documentKey={"_id": 4}, fullDocument={"_id": 4}),
    update("orders", {"status": "shipped"}),
    update("orders", {"status": None}),
    update("orders", {"status": "paid", "total": 3}),
    update("orders", {"total": 3}),
    update("orders", {"status.code": 3}),
    update("orders", {}, removed=["status"]),
    event("orders", "replace", documentKey={"_id": 3}, fullDocument={"_id": 3, "status": "x"}),
    event("orders", "delete", documentKey={"_id": 3}),
    event("orders", "drop"),
    event("invoices", "insert", documentKey={"_id": 5}, fullDocument={"_id": 5, "status": "new"}),
    {"_id": {"_data": "82FF"}, "operationType": "dropDatabase", "ns": {"db": "app"}},
    {"_id": {"_data": "82FF"}, "operationType": "invalidate"},
]

ROUTE_TABLES: dict[str, list[Route]] = {
    "default": list(ROUTES),
    "field_changed_on_every_kind": [
        Route("orders", ["insert", "update", "replace"], ["tasks.a"], when=FieldChanged("status")),
        Route("users", ["delete"], ["tasks.b"]),
    ],
    "overlapping": [
        Route("users", ["insert", "update"], ["tasks.a"], when=FieldChanged("status")),
        Route("users", ["update"], ["tasks.a"]),
        Route("orders", ["delete", "drop"], ["tasks.c"]),
    ],
}


@pytest.mark.parametrize("table", sorted(ROUTE_TABLES))
def test_compiled_match_selects_exactly_the_routed_events(table: str) -> None:
    """The server-side filter and the client-side decision agree on every sample event.

    mongomock evaluates the compiled $match as MongoDB would on the change event documents.
    """
    routes = ROUTE_TABLES[table]
    collection = mongomock.MongoClient().db.events
    collection.insert_many([{**change, "_id": i} for i, change in enumerate(SAMPLE_EVENTS)])
    selected = {doc["_id"] for doc in collection.find(compile_match(routes))}
    routed = {i for i, change in enumerate(SAMPLE_EVENTS) if tasks_for(change, routes)}
    assert routed, "the sample should exercise some routes"
    assert selected == routed


@pytest.mark.parametrize("table", sorted(ROUTE_TABLES))
def test_tasks_for_names_the_tasks_of_the_routes_that_match(table: str) -> None:
    """tasks_for looks routes up by (collection, operation type): the same answer as trying each one."""
    routes = ROUTE_TABLES[table]
    for change in SAMPLE_EVENTS:
        matching = [route for route in routes if route.matches(change)]
        expected = list(dict.fromkeys(task for route in matching for task in route.tasks))
        assert tasks_for(change, routes) == expected, change
        assert tasks_for(change, tuple(routes)) == expected, change
