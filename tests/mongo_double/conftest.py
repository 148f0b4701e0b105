"""Helpers for the conformance suite: waiting for change events and configuring fail points.

The suite talks to the server only through pymongo (and raw sockets for framing tests), so it runs
unchanged against a real MongoDB 7.0 replica set when MONGODB_URI is set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pymongo
import pytest
from pymongo.change_stream import ChangeStream
from pymongo.errors import OperationFailure

EVENT_TIMEOUT = 10.0


def next_event(stream: ChangeStream, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
    """The next change event, or fail after `timeout` seconds (never hangs a test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = stream.try_next()
        if event is not None:
            return event
    raise AssertionError(f"no change event within {timeout}s")


def take_events(stream: ChangeStream, n: int, timeout: float = EVENT_TIMEOUT) -> list[dict[str, Any]]:
    return [next_event(stream, timeout) for _ in range(n)]


def assert_no_event(stream: ChangeStream) -> None:
    # One try_next() is one getMore that waits maxAwaitTimeMS: enough for an event already written.
    assert stream.try_next() is None


@pytest.fixture(scope="session")
def test_commands(mongo_client: pymongo.MongoClient) -> bool:
    """Whether configureFailPoint exists (a real mongod needs --setParameter enableTestCommands=1)."""
    try:
        mongo_client.admin.command("configureFailPoint", "failCommand", mode="off")
    except OperationFailure:
        return False
    return True


FailPoint = Callable[..., dict[str, Any]]


@pytest.fixture
def fail_point(mongo_client: pymongo.MongoClient, test_commands: bool) -> Iterator[FailPoint]:
    """configure(name="failCommand", mode=..., data=...) and switch every used fail point off afterwards."""
    if not test_commands:
        pytest.skip("the server has no configureFailPoint (start mongod with enableTestCommands=1)")
    used: set[str] = set()

    def configure(mode: Any, data: dict[str, Any] | None = None, name: str = "failCommand") -> dict[str, Any]:
        used.add(name)
        return mongo_client.admin.command({"configureFailPoint": name, "mode": mode, "data": data or {}})

    yield configure
    for name in used:
        mongo_client.admin.command({"configureFailPoint": name, "mode": "off"})


@pytest.fixture
def only_double(real_mongodb: bool) -> None:
    if real_mongodb:
        pytest.skip("specific to the MongoDB test server (mongo_double)")
