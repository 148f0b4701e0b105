"""The dedup guard's lease and retry behaviour, with the welcome email as the task under test."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from bson import ObjectId
from celery._state import _task_stack
from celery.exceptions import Reject, Retry, TimeLimitExceeded
from pymongo.database import Database

from changeflow.worker.dedup import Claim, get_dedup_store
from changeflow.worker.keys import dedup_key
from changeflow.worker.mongo import get_db
from changeflow.worker.settings import Settings
from changeflow.worker.testing import configured
from harness.ports import free_port
from harness.redis_server import RedisServer
from harness.smtp_sink import SmtpSink
from tasks.analytics import update_analytics
from tasks.email import send_welcome_email

from .test_tasks import servers, user_insert


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def worker(redis_server: RedisServer, smtp: SmtpSink, mongodb_uri: str, db: Database) -> Iterator[Settings]:
    with configured(**servers(redis_server, smtp, MONGODB_URI=mongodb_uri, MONGODB_DB=db.name)) as settings:
        yield settings


def welcome_event() -> tuple[dict[str, Any], str]:
    event = user_insert({"_id": ObjectId(), "email": "ada@example.com", "name": "Ada"})
    return event, dedup_key(event["_id"], "tasks.send_welcome_email")


def test_a_held_lease_makes_another_delivery_retry_later(
    worker: Settings, smtp: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="changeflow.worker.idempotent")
    event, key = welcome_event()
    store = get_dedup_store()
    assert store.claim(key, "another-worker") is Claim.ACQUIRED  # a delivery of the same event is running

    result = send_welcome_email.apply(args=[event], task_id=key)

    assert result.state == "RETRY"  # not a failure, no dead letter
    assert smtp.messages == []
    assert store.lease_owner(key) == "another-worker"  # untouched
    assert not store.is_done(key)
    assert f"lease busy tasks.send_welcome_email {key}" in caplog.text

    store.release_lease(key, "another-worker")  # it failed and let go: the retry runs the task
    assert send_welcome_email.apply(args=[event], task_id=key).state == "SUCCESS"
    assert len(smtp.wait_for(1)) == 1


def test_a_lease_retry_is_republished_with_the_same_id_and_retry_count(
    worker: Settings, redis_server: RedisServer
) -> None:
    event, key = welcome_event()
    assert get_dedup_store().claim(key, "another-worker") is Claim.ACQUIRED
    # What a worker's request looks like (not eager): the guard must publish the retry itself.
    send_welcome_email.push_request(
        id=key, args=[event], kwargs={}, retries=1, is_eager=False, called_directly=False,
        delivery_info={"exchange": "", "routing_key": "celery"},
    )  # fmt: skip
    try:
        with pytest.raises(Retry):
            send_welcome_email(event)
    finally:
        send_welcome_email.pop_request()

    broker = redis.Redis.from_url(redis_server.url)
    [raw] = broker.lrange("celery", 0, -1)
    headers = json.loads(raw)["headers"]
    assert (headers["id"], headers["task"], headers["retries"]) == (key, "tasks.send_welcome_email", 1)
    assert headers["eta"] is not None  # later, not right away
    broker.close()


def test_a_retry_the_broker_refuses_hands_the_message_back_instead_of_dropping_it(
    redis_server: RedisServer, mongodb_uri: str, db: Database, smtp: SmtpSink
) -> None:
    # The dedup store answers, the broker does not: the retry of a transient failure cannot be sent.
    env = servers(redis_server, smtp, MONGODB_URI=mongodb_uri, MONGODB_DB=db.name)
    env |= {"CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "REDIS_URL": redis_server.url}
    with configured(**env):
        event, key = welcome_event()
        smtp.fail_next(1)  # 451: transient, so the guard asks Celery to retry
        _task_stack.push(send_welcome_email)  # as a worker's tracer does (current_task)
        send_welcome_email.push_request(
            id=key, args=[event], kwargs={}, retries=0, is_eager=False, called_directly=False,
            delivery_info={"exchange": "", "routing_key": "celery"},
        )  # fmt: skip
        try:
            with pytest.raises(Reject) as rejected:
                send_welcome_email(event)
        finally:
            send_welcome_email.pop_request()
            _task_stack.pop()

        assert rejected.value.requeue is True  # Celery's own retry would have dropped it (requeue=False)
        store = get_dedup_store()
        assert not store.is_done(key)
        assert store.lease_owner(key) is None  # released: the requeued message can run at once


def test_an_expired_lease_does_not_wedge_the_key(worker: Settings, smtp: SmtpSink) -> None:
    event, key = welcome_event()
    store = get_dedup_store()
    assert store.claim(key, "worker-that-died") is Claim.ACQUIRED
    store.client.pexpire(store.lease_key(key), 50)  # its TTL (hard time limit + margin) ran out
    time.sleep(0.1)

    assert send_welcome_email.apply(args=[event], task_id=key).state == "SUCCESS"
    assert len(smtp.wait_for(1)) == 1
    assert store.is_done(key)
    assert store.lease_owner(key) is None


def test_a_transient_smtp_error_is_retried_and_sends_once(worker: Settings, smtp: SmtpSink) -> None:
    event, key = welcome_event()
    smtp.fail_next(1)  # 451: try again later

    result = send_welcome_email.apply(args=[event], task_id=key)

    assert result.state == "SUCCESS"  # apply() runs the retry right away (no countdown)
    assert smtp.count_by_message_id() == {f"<{key}@changeflow>": 1}
    assert get_dedup_store().is_done(key)


def test_exhausted_retries_end_in_a_dead_letter(
    redis_server: RedisServer, mongodb_uri: str, db: Database, smtp: SmtpSink
) -> None:
    unreachable = {"SMTP_PORT": str(free_port())}  # nobody listens: connection refused, transient
    env = servers(redis_server, smtp, MONGODB_URI=mongodb_uri, MONGODB_DB=db.name) | unreachable
    with configured(**env) as settings:
        event, key = welcome_event()
        result = send_welcome_email.apply(args=[event], task_id=key)

        assert result.state == "FAILURE"
        assert isinstance(result.result, ConnectionError)
        letter = db.changeflow_dead_letters.find_one({"_id": key})
        assert letter is not None
        assert letter["reason"] == "retries_exhausted"
        assert letter["attempts"] == settings.task_max_retries + 1 == 3
        assert "ConnectionRefusedError" in letter["error"]
        assert letter["traceback"].splitlines()[-1].startswith("ConnectionRefusedError")
        store = get_dedup_store()
        assert not store.is_done(key)  # replayable
        assert store.lease_owner(key) is None  # released on the way out


def test_a_direct_call_has_no_key(worker: Settings, smtp: SmtpSink) -> None:
    # No task id, no key: e.g. from a shell. current_key() then has nothing to derive a Message-ID from.
    event, _ = welcome_event()
    with pytest.raises(RuntimeError, match="only available inside a running changeflow task"):
        send_welcome_email(event)
    assert smtp.messages == []


def test_an_unexpected_error_is_a_permanent_dead_letter(worker: Settings, db: Database) -> None:
    # Bad data a retry cannot fix (here: an event without wallTime or clusterTime).
    event = {"_id": {"_data": "82BAD"}, "operationType": "insert", "fullDocument": {"status": "paid"}}
    key = dedup_key(event["_id"], "tasks.update_analytics")

    assert update_analytics.apply(args=[event], task_id=key).state == "FAILURE"

    letter = db.changeflow_dead_letters.find_one({"_id": key})
    assert letter is not None
    assert (letter["reason"], letter["attempts"]) == ("permanent", 1)
    assert letter["error"].startswith("ValueError: ")
    assert db.order_analytics.count_documents({}) == 0


def test_a_hard_time_limit_kill_is_a_dead_letter(worker: Settings, db: Database) -> None:
    # Celery calls on_failure in the main process after killing the pool process.
    event, key = welcome_event()
    send_welcome_email.on_failure(TimeLimitExceeded(60), key, [event], {}, None)

    letter = db.changeflow_dead_letters.find_one({"_id": key})
    assert letter is not None and letter["reason"] == "permanent"
    assert "hard time limit (60s)" in letter["error"]
    assert letter["event_id"] == event["_id"]


def test_clients_are_recreated_in_a_forked_process(worker: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # pymongo clients are not fork-safe; neither is sharing a redis connection pool.
    db_before, store_before = get_db(), get_dedup_store()
    assert get_db().client is db_before.client and get_dedup_store() is store_before
    monkeypatch.setattr(os, "getpid", lambda: -1)
    assert get_db().client is not db_before.client
    assert get_dedup_store() is not store_before


def test_a_tasks_own_max_retries_ends_in_a_dead_letter_too(
    redis_server: RedisServer, db: Database, mongodb_uri: str, smtp: SmtpSink
) -> None:
    """`@app.on(..., max_retries=N)` (a task option passed to Celery) is the guard's limit for that task."""
    from changeflow.worker.errors import TransientTaskError
    from changeflow.worker.idempotent import IdempotentTask
    from worker import app

    name = "tests.always_transient"
    if name not in app.tasks:

        @app.task(name=name, base=IdempotentTask, max_retries=1)
        def always_transient(event: dict[str, Any]) -> None:
            raise TransientTaskError("not yet")

    with configured(**servers(redis_server, smtp, MONGODB_URI=mongodb_uri, MONGODB_DB=db.name)) as settings:
        event, _ = welcome_event()
        key = dedup_key(event["_id"], name)
        result = app.tasks[name].apply(args=[event], task_id=key)
        assert result.state == "FAILURE"
        letter = db.changeflow_dead_letters.find_one({"_id": key})
        assert letter is not None, "a task's own max_retries must end in a dead letter, never a lost task"
        assert (letter["reason"], letter["attempts"]) == ("retries_exhausted", 2)
        assert settings.task_max_retries == 2  # the setting alone would have allowed 3 attempts
