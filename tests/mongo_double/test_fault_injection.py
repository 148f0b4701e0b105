"""Fail points (configureFailPoint) and transparent change-stream resumption.

Needs test commands; against a real mongod without enableTestCommands these tests skip.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pymongo
import pytest
from pymongo.database import Database
from pymongo.errors import AutoReconnect, NotPrimaryError, OperationFailure

from tests.mongo_double.helpers import FailPoint, assert_no_event, take_events

pytestmark = [pytest.mark.faults, pytest.mark.needs_test_commands]


def test_error_code_times_and_labels(db: Database, fail_point: FailPoint) -> None:
    fail_point({"times": 1}, {"failCommands": ["find"], "errorCode": 2, "errorLabels": ["SomeLabel"]})
    with pytest.raises(OperationFailure) as info:
        db.c.find_one()
    assert info.value.code == 2
    assert info.value.has_error_label("SomeLabel")
    assert "failCommand" in str(info.value)
    assert db.c.find_one() is None  # times: 1 is used up


def test_always_on_and_off(db: Database, fail_point: FailPoint) -> None:
    fail_point("alwaysOn", {"failCommands": ["count"], "errorCode": 8})
    for _ in range(2):
        with pytest.raises(OperationFailure):
            db.command("count", "c")
    db.c.insert_one({})  # other commands are unaffected
    fail_point("off")
    assert db.command("count", "c")["n"] == 1


def test_skip_mode(db: Database, fail_point: FailPoint) -> None:
    fail_point({"skip": 2}, {"failCommands": ["distinct"], "errorCode": 8})
    db.c.distinct("x")
    db.c.distinct("x")
    with pytest.raises(OperationFailure):
        db.c.distinct("x")


def test_app_name_filter(mongodb_uri: str, db: Database, fail_point: FailPoint) -> None:
    app = f"faulty-{uuid.uuid4().hex[:6]}"
    fail_point("alwaysOn", {"failCommands": ["find"], "errorCode": 8, "appName": app})
    faulty: pymongo.MongoClient = pymongo.MongoClient(
        mongodb_uri, appName=app, serverSelectionTimeoutMS=10_000
    )
    try:
        with pytest.raises(OperationFailure):
            faulty[db.name].c.find_one()
        assert db.c.find_one() is None  # a client with another appName is unaffected
    finally:
        faulty.close()


def test_block_connection(db: Database, fail_point: FailPoint) -> None:
    fail_point({"times": 1}, {"failCommands": ["find"], "blockConnection": True, "blockTimeMS": 300})
    started = time.monotonic()
    db.c.find_one()
    assert time.monotonic() - started >= 0.29


def test_close_connection_then_retryable_write_succeeds_once(db: Database, fail_point: FailPoint) -> None:
    fail_point({"times": 1}, {"failCommands": ["insert"], "closeConnection": True})
    db.c.insert_one({"_id": "once"})  # retryable writes: pymongo retries after the network error
    assert db.c.count_documents({"_id": "once"}) == 1


def test_close_connection_surfaces_as_network_error(
    mongodb_uri: str, db: Database, fail_point: FailPoint
) -> None:
    fail_point({"times": 1}, {"failCommands": ["find"], "closeConnection": True})
    client: pymongo.MongoClient = pymongo.MongoClient(
        mongodb_uri, retryReads=False, serverSelectionTimeoutMS=10_000
    )
    try:
        with pytest.raises(AutoReconnect):
            client[db.name].c.find_one()
        assert client[db.name].c.find_one() is None
    finally:
        client.close()


def test_not_primary_error_code(mongodb_uri: str, db: Database, fail_point: FailPoint) -> None:
    fail_point({"times": 1}, {"failCommands": ["insert"], "errorCode": 10107})
    client: pymongo.MongoClient = pymongo.MongoClient(
        mongodb_uri, retryWrites=False, serverSelectionTimeoutMS=10_000
    )
    try:
        with pytest.raises(NotPrimaryError):
            client[db.name].c.insert_one({"_id": 1})
        client[db.name].c.insert_one({"_id": 2})  # the client rediscovers the primary
    finally:
        client.close()


def test_write_error_label_on_retryable_write(mongodb_uri: str, db: Database, fail_point: FailPoint) -> None:
    fail_point({"times": 1}, {"failCommands": ["insert"], "errorCode": 91})
    db.c.insert_one({"_id": "retried"})  # 91 is retryable: the server labels it, pymongo retries
    assert db.c.count_documents({}) == 1


def _resume_without_loss(db: Database, configure: Callable[[], object]) -> None:
    with db.c.watch(max_await_time_ms=200) as stream:
        db.c.insert_many([{"_id": i} for i in range(3)])
        first = take_events(stream, 3)
        configure()
        db.c.insert_many([{"_id": i} for i in range(3, 6)])
        rest = take_events(stream, 3)
        assert_no_event(stream)
    assert [e["documentKey"]["_id"] for e in first + rest] == list(range(6))


def test_change_stream_resumes_after_get_more_error_with_label(db: Database, fail_point: FailPoint) -> None:
    _resume_without_loss(
        db,
        lambda: fail_point(
            {"times": 1},
            {"failCommands": ["getMore"], "errorCode": 6, "errorLabels": ["ResumableChangeStreamError"]},
        ),
    )


def test_change_stream_resumes_after_closed_connection(db: Database, fail_point: FailPoint) -> None:
    _resume_without_loss(
        db, lambda: fail_point({"times": 1}, {"failCommands": ["getMore"], "closeConnection": True})
    )


def test_change_stream_resumes_when_server_labels_error(db: Database, fail_point: FailPoint) -> None:
    # failGetMoreAfterCursorCheckout: the server adds ResumableChangeStreamError itself.
    _resume_without_loss(
        db, lambda: fail_point({"times": 1}, {"errorCode": 6}, name="failGetMoreAfterCursorCheckout")
    )


def test_change_stream_resumes_after_cursor_not_found(db: Database, fail_point: FailPoint) -> None:
    _resume_without_loss(db, lambda: fail_point({"times": 1}, {"failCommands": ["getMore"], "errorCode": 43}))


def test_non_resumable_error_surfaces(db: Database, fail_point: FailPoint) -> None:
    with db.c.watch(max_await_time_ms=200) as stream:
        fail_point(
            {"times": 1},
            {"failCommands": ["getMore"], "errorCode": 280, "errorLabels": ["NonResumableChangeStreamError"]},
        )
        with pytest.raises(OperationFailure) as info:
            stream.try_next()
    assert info.value.code == 280
