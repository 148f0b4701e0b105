"""Helpers for the conformance suite: waiting for change events without ever hanging a test."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pymongo.change_stream import ChangeStream

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


FailPoint = Callable[..., dict[str, Any]]
