"""changeflow.worker.errors.is_transient: the one place that decides retry (with backoff) vs. dead letter."""

from __future__ import annotations

import smtplib

import pymongo.errors
import pytest
import redis.exceptions
from celery.exceptions import SoftTimeLimitExceeded
from redis._parsers.base import BaseParser

from changeflow.worker.errors import (
    TRANSIENT_REDIS_REPLIES,
    PermanentTaskError,
    TransientTaskError,
    is_transient,
    redis_reply_code,
)


def reply(text: str) -> redis.exceptions.RedisError:
    """The exception redis-py raises for an error reply `text`, through its own reply parser."""
    error = BaseParser.parse_error(text)
    assert isinstance(error, redis.exceptions.RedisError)
    return error


# Replies a Redis sends when it cannot take a write now; each must be retried, not dead-lettered.
TRANSIENT_REPLIES = [
    "OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY You can't write against a read only replica.",
    "LOADING Redis is loading the dataset in memory",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "CLUSTERDOWN The cluster is down",
    "NOREPLICAS Not enough good replicas to write.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
    # An error inside a Lua script (the dedup store's claim and mark_done are scripts).
    "ERR Error running script (call to f_0123): @user_script:3: -OOM command not allowed",
]


def reply_id(text: str) -> str:
    return text.split()[0] + ("-script" if "@" in text else "")


@pytest.mark.parametrize("text", TRANSIENT_REPLIES, ids=reply_id)
def test_redis_replies_that_mean_not_now_are_transient(text: str) -> None:
    assert is_transient(reply(text))


def test_the_redis_py_classes_are_used_where_they_exist() -> None:
    # redis-py maps these replies to classes and strips the code from the message: the class decides.
    for text, cls in [
        ("OOM command not allowed", redis.exceptions.OutOfMemoryError),
        ("READONLY You can't write", redis.exceptions.ReadOnlyError),
        ("LOADING Redis is loading", redis.exceptions.BusyLoadingError),
        ("MASTERDOWN Link with MASTER is down", redis.exceptions.MasterDownError),
    ]:
        error = reply(text)
        assert isinstance(error, cls) and not str(error).startswith(text.split()[0])
        assert is_transient(error)


@pytest.mark.parametrize(
    "text",
    [
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "BUSYKEY Target key name already exists.",  # not BUSY
        "ERR unknown command 'FOO'",
        "NOPERM this user has no permissions to run the 'set' command",
        "ERR Error running script (call to f_0123): @user_script:1: user_script:1: bad argument",
    ],
)
def test_other_redis_replies_are_permanent(text: str) -> None:
    assert not is_transient(reply(text))


def test_reply_code_is_the_first_word_or_the_script_errors_code() -> None:
    assert redis_reply_code(reply("BUSY Redis is busy")) == "BUSY"
    assert redis_reply_code(reply("ERR Error running script: @user_script:3: -READONLY x")) == "READONLY"
    assert redis_reply_code(reply("WRONGTYPE no")) == "WRONGTYPE"
    assert redis_reply_code(ValueError("BUSY")) is None  # only Redis replies have codes
    assert {"OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN"} <= TRANSIENT_REDIS_REPLIES


@pytest.mark.parametrize(
    "exc",
    [
        TransientTaskError("451"),
        ConnectionRefusedError(),
        TimeoutError(),
        smtplib.SMTPServerDisconnected(),
        pymongo.errors.AutoReconnect(),
        redis.exceptions.ConnectionError(),
        redis.exceptions.TimeoutError(),
        SoftTimeLimitExceeded(),
    ],
)
def test_connection_errors_stay_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        PermanentTaskError("no email"),
        ValueError("bad data"),
        KeyError("x"),
        pymongo.errors.OperationFailure("not authorized", code=13),
        smtplib.SMTPDataError(550, b"no"),
    ],
)
def test_bugs_and_refusals_are_permanent(exc: BaseException) -> None:
    assert not is_transient(exc)
