"""An ordered task's end runs its key's parked tasks inline (a chain), through the same guard.

The shipping notification (`ordered_by=True`) is delivered as a worker's request (not eager), so the
guard chains, publishes retries and hands over to the broker as it does in a worker process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from bson import ObjectId
from celery._state import _task_stack
from celery.exceptions import TimeLimitExceeded
from pymongo.database import Database

from changeflow.listener.ordering import order_key
from changeflow.worker.dedup import get_dedup_store
from changeflow.worker.keys import dedup_key
from changeflow.worker.ordering import Order, OrderBook, order_headers, queue_key
from changeflow.worker.testing import configured
from harness.redis_server import RedisServer
from harness.smtp_sink import SmtpSink
from tasks.email import send_shipping_notification

from .test_tasks import order_update, order_with_user, servers

TASK = "tasks.send_shipping_notification"


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def worker_env(
    redis_server: RedisServer, smtp: SmtpSink, uri: str, db: Database, **more: str
) -> dict[str, str]:
    return servers(redis_server, smtp, MONGODB_URI=uri, MONGODB_DB=db.name, **more)


def ordered_events(order: dict[str, Any], statuses: list[str]) -> list[tuple[dict[str, Any], Order, str]]:
    """One status update per entry, in stream order (members sort as their resume tokens would)."""
    found = []
    for i, status in enumerate(statuses):
        event = order_update(order, {"status": status})
        event["_id"] = {"_data": f"82{i:04d}"}
        found.append(
            (
                event,
                Order(order_key(event, "documentKey") or "", event["_id"]["_data"]),
                dedup_key(event["_id"], TASK),
            )
        )
    OrderBook(get_dedup_store().client).register([(TASK, o) for _, o, _ in found])
    return found


def deliver(event: dict[str, Any], order: Order, key: str) -> None:
    """Run the task as a worker does for a delivered message (request context, current task)."""
    task = send_shipping_notification
    _task_stack.push(task)
    task.push_request(
        id=key, args=[event], kwargs={}, retries=0, is_eager=False, called_directly=False,
        delivery_info={"exchange": "", "routing_key": "celery"}, headers=order_headers(order),
    )  # fmt: skip
    try:
        task(event)
    finally:
        task.pop_request()
        _task_stack.pop()


def queued(broker: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw)["headers"] for raw in broker.lrange("celery", 0, -1)]


def test_the_end_of_a_head_runs_its_parked_successors_inline_in_order(
    redis_server: RedisServer, smtp: SmtpSink, mongodb_uri: str, db: Database, broker: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="changeflow.worker.idempotent")
    with configured(**worker_env(redis_server, smtp, mongodb_uri, db)):
        _, order = order_with_user(db)
        events = ordered_events(order, ["shipped", "delivered", "shipped"])
        for later in events[:0:-1]:  # the later ones arrive first: parked, no effect
            deliver(*later)
        assert smtp.messages == []
        deliver(*events[0])

        keys = [key for _, _, key in events]
        assert [str(m["Message-ID"]) for m in smtp.wait_for(3)] == [f"<{k}@changeflow>" for k in keys]
        assert all(get_dedup_store().is_done(k) for k in keys)
        assert queued(broker) == []  # nothing published again
        assert not broker.exists(queue_key(TASK, events[0][1].key))
        assert not list(broker.scan_iter("changeflow:parked:*"))
        assert f"chained {TASK}[{keys[1]}] started" in caplog.text
        assert f"chained {TASK}[{keys[2]}] ended" in caplog.text


def test_past_its_cap_a_chain_publishes_the_next_parked_task(
    redis_server: RedisServer, smtp: SmtpSink, mongodb_uri: str, db: Database, broker: redis.Redis
) -> None:
    with configured(**worker_env(redis_server, smtp, mongodb_uri, db, ORDERED_CHAIN_MAX_TASKS="1")):
        _, order = order_with_user(db)
        events = ordered_events(order, ["shipped", "delivered", "shipped"])
        deliver(*events[2])
        deliver(*events[1])
        deliver(*events[0])

        keys = [key for _, _, key in events]
        assert [str(m["Message-ID"]) for m in smtp.wait_for(2)] == [f"<{k}@changeflow>" for k in keys[:2]]
        [copy] = queued(broker)
        assert (copy["id"], copy["changeflow_order_member"]) == (keys[2], events[2][1].member)
        # Its parked copy stays until that message passes the gate.
        assert OrderBook(get_dedup_store().client).parked(TASK, events[2][1].key).keys() == {"820002"}


def test_a_chained_task_that_fails_transiently_is_retried_as_a_message_of_its_own(
    redis_server: RedisServer, smtp: SmtpSink, mongodb_uri: str, db: Database, broker: redis.Redis
) -> None:
    with configured(**worker_env(redis_server, smtp, mongodb_uri, db)):
        _, order = order_with_user(db)
        events = ordered_events(order, ["paid", "shipped", "delivered"])  # "paid" sends nothing
        deliver(*events[2])
        deliver(*events[1])
        smtp.fail_next(1)  # the chained "shipped": 451
        deliver(*events[0])

        keys = [key for _, _, key in events]
        [retry] = queued(broker)
        assert (retry["id"], retry["retries"]) == (keys[1], 1)
        assert retry["eta"] is not None and retry["changeflow_order_member"] == "820001"
        assert "changeflow_first_attempt" in retry
        book = OrderBook(get_dedup_store().client)
        # It stays its key's head, the next one waits parked; nothing was sent.
        assert book.members(TASK, events[0][1].key) == ["820001", "820002"]
        assert set(book.parked(TASK, events[0][1].key)) == {"820001", "820002"}
        assert smtp.messages == []
        assert get_dedup_store().is_done(keys[0]) and not get_dedup_store().is_done(keys[1])


def test_a_chained_task_that_fails_permanently_is_its_own_dead_letter_and_the_chain_goes_on(
    redis_server: RedisServer, smtp: SmtpSink, mongodb_uri: str, db: Database, broker: redis.Redis
) -> None:
    with configured(**worker_env(redis_server, smtp, mongodb_uri, db)):
        _, order = order_with_user(db)
        lost = {**order, "_id": ObjectId(), "user_id": ObjectId()}  # its user is missing: permanent
        events = ordered_events(order, ["paid", "shipped", "delivered"])
        bad = order_update(lost, {"status": "shipped"})
        events[1] = (
            {**bad, "_id": events[1][0]["_id"], "documentKey": {"_id": order["_id"]}},
            *events[1][1:],
        )
        deliver(*events[2])
        deliver(*events[1])
        deliver(*events[0])

        keys = [key for _, _, key in events]
        [letter] = db.changeflow_dead_letters.find()
        assert (letter["task_id"], letter["reason"]) == (keys[1], "permanent")
        assert letter["ordering"]["ran_past"] == [keys[2]]
        assert [str(m["Message-ID"]) for m in smtp.wait_for(1)] == [f"<{keys[2]}@changeflow>"]
        assert queued(broker) == []
        assert not list(broker.scan_iter("changeflow:*order*")) and not list(
            broker.scan_iter("changeflow:parked:*")
        )


def test_a_hard_time_limit_during_a_chain_publishes_the_chained_task_not_a_dead_letter_of_the_head(
    redis_server: RedisServer, smtp: SmtpSink, mongodb_uri: str, db: Database, broker: redis.Redis
) -> None:
    """The pool process died in a task run inline; Celery reports the limit for the head, which ended."""
    with configured(**worker_env(redis_server, smtp, mongodb_uri, db)):
        _, order = order_with_user(db)
        events = ordered_events(order, ["shipped", "delivered"])
        deliver(*events[1])  # parked
        (head, head_order, head_key), (_, later_order, later_key) = events
        store = get_dedup_store()
        book = OrderBook(store.client)
        assert book.advance(TASK, head_order).head == later_order.member  # the head ended ...
        store.claim(head_key, "killed")
        store.mark_done(head_key, "killed")
        assert (
            book.gate(TASK, later_order, b"", keep_parked=True).name == "HEAD"
        )  # ... its successor ran inline
        send_shipping_notification.on_failure(TimeLimitExceeded(60), head_key, [head], {}, None)

        assert db.changeflow_dead_letters.count_documents({}) == 0
        [copy] = queued(broker)
        assert (copy["id"], copy["changeflow_order_member"]) == (later_key, later_order.member)
