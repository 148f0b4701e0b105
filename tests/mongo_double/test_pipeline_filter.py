"""The change-stream pipeline's $match fast path gives mongomock's own answers, errors included."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from bson import ObjectId, Timestamp

from changeflow.listener.routes import compile_match
from changeflow.testing.mongo_double.changestreams import apply_pipeline, compile_pipeline
from changeflow.testing.mongo_double.errors import MongoError
from worker import app as repo_app

ROUTES = repo_app.routes  # this repository's app (tasks/): the card's routes

WHEN = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901)


def event(op: str, coll: str, **fields: Any) -> dict[str, Any]:
    return {
        "_id": {"_data": f"82{abs(hash((op, coll, repr(fields)))) % 10**8:08d}"},
        "operationType": op,
        "clusterTime": Timestamp(1_700_000_000, 1),
        "wallTime": WHEN,
        "ns": {"db": "app", "coll": coll},
        "documentKey": {"_id": ObjectId()},
        **fields,
    }


EVENTS = [
    event("insert", "users", fullDocument={"email": "a@example.test", "at": WHEN}),
    event("insert", "orders", fullDocument={"status": "pending", "n": 3}),
    event("update", "orders", updateDescription={"updatedFields": {"status": "sent"}, "removedFields": []}),
    event("update", "orders", updateDescription={"updatedFields": {"note": "x"}, "removedFields": []}),
    event("delete", "users"),
    event("insert", "changeflow_checkpoints", fullDocument={"n": 1}),
    {
        "_id": {"_data": "82FF"},
        "operationType": "invalidate",
        "clusterTime": Timestamp(1, 1),
        "wallTime": WHEN - datetime.timedelta(days=1),
    },
]

STAGES = [
    [{"$match": compile_match(ROUTES)}],  # what the listener sends
    [{"$match": {"operationType": {"$in": ["insert", "update"]}}}, {"$match": {"ns.coll": "orders"}}],
    [{"$match": {"fullDocument.n": {"$gte": 2}}}],
    [{"$match": {"wallTime": {"$gte": WHEN.replace(tzinfo=datetime.UTC)}}}],  # aware vs naive
    [{"$match": {"$or": [{"operationType": "delete"}, {"fullDocument.email": {"$exists": True}}]}}],
]


@pytest.mark.parametrize("stages", STAGES, ids=range(len(STAGES)))
def test_match_only_pipelines_pass_the_events_mongomocks_pipeline_passes(
    stages: list[dict[str, Any]],
) -> None:
    run = compile_pipeline(stages)
    passed = [i for i, e in enumerate(EVENTS) if run(e)]
    assert passed == [i for i, e in enumerate(EVENTS) if apply_pipeline(e, stages)]
    assert 0 < len(passed) < len(EVENTS)  # each case keeps some events and drops others


def test_an_unsupported_operator_is_the_same_error_on_both_paths() -> None:
    stages = [{"$match": {"ns": {"$nosuchop": 1}}}]
    with pytest.raises(MongoError) as slow:
        apply_pipeline(EVENTS[0], stages)
    with pytest.raises(MongoError) as fast:
        compile_pipeline(stages)(EVENTS[0])
    assert (fast.value.code, str(fast.value)) == (slow.value.code, str(slow.value))


def test_other_stages_still_run_through_mongomock() -> None:
    stages = [{"$match": {"ns.coll": "users"}}, {"$project": {"operationType": 1}}]
    assert compile_pipeline(stages)(EVENTS[0]) == [{"_id": EVENTS[0]["_id"], "operationType": "insert"}]
