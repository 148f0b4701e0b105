"""Batched tasks, the pure parts: the declaration, reading a message's events, the handler's report,
the listener's grouping (changeflow/worker/batches.py, changeflow/listener/batching.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from changeflow import Changeflow, PermanentTaskError, Skip
from changeflow.listener.batching import BatchingPublisher, batch_sizes, group
from changeflow.listener.pipelined import batch_argsrepr
from changeflow.listener.publish import Message, Rejected, messages_for
from changeflow.worker.batches import (
    MAX_BATCH,
    BatchTask,
    Item,
    Outcomes,
    batch_id,
    failures_of,
    items_of,
    sort_outcome,
)
from changeflow.worker.errors import TransientTaskError
from changeflow.worker.keys import dedup_key
from changeflow.worker.settings import Settings


def event(n: int, coll: str = "orders") -> dict[str, Any]:
    return {
        "_id": {"_data": f"82{n:08X}"},
        "operationType": "insert",
        "ns": {"db": "shop", "coll": coll},
        "documentKey": {"_id": n},
        "fullDocument": {"_id": n, "status": "paid"},
    }


def make_app() -> Changeflow:
    return Changeflow("batches", settings=Settings(), package="tests.unit")


# -- declaration ---------------------------------------------------------------------------------


def test_batch_declares_a_batched_task_and_keeps_its_route() -> None:
    app = make_app()

    @app.on("orders", "insert", batch=50)
    def count(events: list[dict[str, Any]]) -> None: ...

    assert isinstance(count, BatchTask) and count.batch_size == 50
    assert [r.tasks for r in app.routes] == [(count.name,)]
    assert batch_sizes(app) == {count.name: 50}


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (0, "between 1 and"),
        (-3, "between 1 and"),
        (MAX_BATCH + 1, "between 1 and"),
        ("100", "must be an int"),
        (2.5, "must be an int"),
        (True, "must be an int"),
    ],
)
def test_a_bad_batch_is_refused_at_import_naming_the_task(batch: object, message: str) -> None:
    app = make_app()
    with pytest.raises(ValueError, match=message) as refused:
        app.on("orders", "insert", batch=batch, name="acme.count")(lambda events: None)  # type: ignore[arg-type]
    assert "acme.count" in str(refused.value)
    assert "acme.count" not in app._tasks and app.routes == ()  # nothing half-registered


def test_batch_and_ordered_by_are_refused_together_whatever_the_order() -> None:
    app = make_app()
    with pytest.raises(ValueError, match="cannot go together"):
        app.on("orders", "insert", batch=10, ordered_by=True, name="a.one")(lambda events: None)

    @app.on("orders", "insert", batch=10, name="a.two")
    def two(events: list[dict[str, Any]]) -> None: ...

    with pytest.raises(ValueError, match="is batched"):
        app.on("orders", "update", ordered_by=True)(two)
    with pytest.raises(ValueError, match="innermost"):
        app.on("orders", "update", batch=5)(two)


def test_a_batched_task_base_must_be_a_batch_task() -> None:
    from changeflow.worker.idempotent import IdempotentTask

    app = make_app()
    with pytest.raises(TypeError, match="subclass BatchTask"):
        app.on("orders", "insert", batch=10, base=IdempotentTask, name="a.b")(lambda events: None)


# -- the worker's reading of a message -----------------------------------------------------------


def test_a_batch_message_gives_each_event_its_own_key() -> None:
    events = [event(1), event(2)]
    items = items_of(([*events],), "the-batch-id", "t.count")
    assert [i.key for i in items] == [dedup_key(e["_id"], "t.count") for e in events]
    assert [i.event for i in items] == events


def test_a_single_event_message_keeps_its_task_id_as_key() -> None:
    # A replay, a backfill, a hard-time-limit copy: `[event]` with the event's key as task id.
    (item,) = items_of((event(1),), "its-key", "t.count")
    assert (item.key, item.event) == ("its-key", event(1))


@pytest.mark.parametrize(
    "args", [(), ([event(1)], "more"), ("text",), ([event(1), {"no": "id"}],), ([event(1), 5],)]
)
def test_a_message_that_is_not_events_is_refused(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        items_of(args, "id", "t.count")


def test_failures_of_reads_the_handlers_report() -> None:
    skip = Skip("nothing")
    assert failures_of(None, 3) == {}
    assert failures_of({2: skip}, 3) == {2: skip}
    for bad in ([1], {3: skip}, {-1: skip}, {True: skip}, {0: "text"}, "x"):
        with pytest.raises(TypeError):
            failures_of(bad, 3)


def test_sort_outcome_per_event() -> None:
    outcomes = Outcomes()
    items = [
        Item("ok", {}),
        Item("skip", {}, Skip("no status")),
        Item("transient", {}, TransientTaskError("later")),
        Item("connection", {}, ConnectionError("reset")),
        Item("permanent", {}, PermanentTaskError("no user")),
        Item("bug", {}, KeyError("x")),
    ]
    for item in items:
        sort_outcome(item, outcomes)
    assert [(i.key, r) for i, r in outcomes.done] == [("ok", "ok"), ("skip", "skipped")]
    assert [i.key for i in outcomes.retry] == ["transient", "connection"]
    assert [i.key for i in outcomes.dead] == ["permanent", "bug"]


# -- the listener's grouping ---------------------------------------------------------------------


def msg(task: str, n: int) -> Message:
    return Message(task, dedup_key(event(n)["_id"], task), event(n))


def test_group_chunks_a_batched_tasks_messages_in_order_and_leaves_the_others() -> None:
    messages = [msg("b", 1), msg("x", 1), msg("b", 2), msg("b", 3), msg("x", 3), msg("b", 4)]
    grouped, members = group(messages, {"b": 2})
    assert [(m.task_name, m.payload) for m in grouped] == [
        ("b", [event(1), event(2)]),
        ("x", event(1)),
        ("b", [event(3), event(4)]),
        ("x", event(3)),
    ]
    first, second = members.values()
    assert [m.task_id for m in first] == [messages[0].task_id, messages[2].task_id]
    assert grouped[0].task_id == batch_id([m.task_id for m in first])
    assert grouped[2].task_id == batch_id([m.task_id for m in second]) != grouped[0].task_id


def test_a_chunk_of_one_stays_the_single_message() -> None:
    messages = [msg("b", 1), msg("b", 2), msg("b", 3)]
    grouped, members = group(messages, {"b": 2})
    assert grouped[1] == messages[2]  # its own id (the event's key) and payload
    assert len(members) == 1


def test_batch_ids_are_stable_and_distinct() -> None:
    assert batch_id(["a", "b"]) == batch_id(["a", "b"])
    assert len({batch_id(["a", "b"]), batch_id(["b", "a"]), batch_id(["a"])}) == 3


class Recording:
    """A publisher that refuses payloads holding the marker "bad" (as a serializer would)."""

    def __init__(self) -> None:
        self.calls: list[list[Message]] = []

    def publish(self, messages: Sequence[Message]) -> list[Rejected]:
        self.calls.append(list(messages))
        return [Rejected(m, "EncodeError: bad", "tb") for m in messages if "bad" in repr(m.payload)]


def test_a_refused_batch_is_sent_again_one_by_one_so_only_the_bad_event_is_rejected() -> None:
    inner = Recording()
    bad = Message("b", "key-bad", {**event(2), "bad": object()})
    messages = [msg("b", 1), bad, msg("b", 3), msg("x", 4)]
    rejected = BatchingPublisher(inner, {"b": 10}).publish(messages)
    assert [r.message for r in rejected] == [bad]  # the listener's own message: its key, its payload
    assert [len(call) for call in inner.calls] == [2, 3]
    assert inner.calls[1] == [msg("b", 1), bad, msg("b", 3)]


def test_publishers_without_batched_tasks_see_the_messages_unchanged() -> None:
    inner = Recording()
    messages = [msg("x", 1), msg("x", 2)]
    assert BatchingPublisher(inner, {"b": 10}).publish(messages) == []
    assert inner.calls == [messages]


def test_the_listener_builds_one_message_per_event_before_grouping() -> None:
    app = make_app()

    @app.on("orders", "insert", batch=3, name="t.count")
    def count(events: list[dict[str, Any]]) -> None: ...

    messages = [m for n in range(4) for m in messages_for(event(n), app.routes)]
    grouped, _ = group(messages, batch_sizes(app))
    assert [len(m.payload) for m in grouped[:1]] == [3] and grouped[1] == messages[3]


def test_batch_argsrepr_names_the_count_and_the_ends() -> None:
    shown = batch_argsrepr([event(1), event(2), event(3)])
    assert shown.startswith("[<3 events> [{'_id': {'_data': '8200000001'}")
    assert "'_data': '8200000003'" in shown and "8200000002" not in shown
