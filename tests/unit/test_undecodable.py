"""A task message the worker cannot decode: a dead letter ("undecodable"), never acked and forgotten."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import mongomock
import pytest
from bson import ObjectId
from kombu.exceptions import DecodeError

import changeflow.worker.consumer
from changeflow.worker.consumer import UNDECODABLE_REQUEUE_SECONDS, Consumer
from changeflow.worker.dead_letters import undecodable_payload

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
OID = ObjectId("65a1b2c3d4e5f60718293a4b")


def old_body() -> str:
    """A body as kombu's plain json wrote a document holding an envelope-shaped dict."""
    payload = {
        "_id": {"_data": "82AB"},
        "documentKey": {"_id": {"__type__": "bson_objectid", "__value__": str(OID)}},
        "fullDocument": {
            "prefs": {"__type__": "x", "__value__": 1},
            "n": {"__type__": "int64", "__value__": 2},
        },
    }
    return json.dumps([[payload], {}, EMBED])


def test_what_can_be_read_of_an_undecodable_body_is_kept() -> None:
    payload = undecodable_payload(old_body().encode())
    assert payload["documentKey"] == {"_id": OID}  # a registered type decodes
    assert type(payload["fullDocument"]["n"]).__name__ == "Int64"
    assert payload["fullDocument"]["prefs"] == {
        "__type__": "x",
        "__value__": 1,
    }  # an unknown one stays a dict


@pytest.mark.parametrize("body", [b"\xff not json", "[1, 2]", '{"a": 1}', "[[5], {}, {}]"])
def test_a_body_that_is_no_task_call_is_kept_as_text(body: bytes | str) -> None:
    payload = undecodable_payload(body)
    assert list(payload) == ["body"] and isinstance(payload["body"], str)


class FakeMessage:
    def __init__(self, body: str) -> None:
        self.body = body.encode()
        self.headers = {"task": "tasks.send_welcome_email", "id": "key-1"}
        self.acked = False
        self.rejected: list[bool] = []

    def ack(self) -> None:
        self.acked = True

    def reject(self, requeue: bool = False) -> None:
        self.rejected.append(requeue)


class FakeHub:
    def __init__(self) -> None:
        self.later: list[tuple[float, Any, tuple[Any, ...]]] = []

    def call_later(self, delay: float, function: Any, *args: Any) -> None:
        self.later.append((delay, function, args))


def test_an_undecodable_message_becomes_a_dead_letter_then_is_acked(monkeypatch: pytest.MonkeyPatch) -> None:
    db = mongomock.MongoClient().db
    monkeypatch.setattr(changeflow.worker.consumer, "get_db", lambda: db)
    message = FakeMessage(old_body())
    Consumer.on_decode_error(SimpleNamespace(hub=FakeHub()), message, DecodeError("Unsupported type"))  # type: ignore[arg-type]
    letter = db.changeflow_dead_letters.find_one({"_id": "key-1"})
    assert letter is not None
    assert (letter["reason"], letter["task"], letter["attempts"]) == (
        "undecodable",
        "tasks.send_welcome_email",
        1,
    )
    assert "DecodeError" in letter["error"] and letter["payload"]["documentKey"] == {"_id": OID}
    assert message.acked and message.rejected == []


class FakeTimer:
    """kombu's Timer.call_after, as the gevent pool's timer takes it: (seconds, function, args)."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Any, tuple[Any, ...]]] = []

    def call_after(self, delay: float, function: Any, args: tuple[Any, ...] = ()) -> None:
        self.later.append((delay, function, args))


@pytest.mark.parametrize("loop", ["hub", "green", "none"])
def test_when_the_letter_cannot_be_stored_the_message_goes_back_to_the_queue(
    monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    def down() -> None:
        raise ConnectionError("MongoDB is down")

    monkeypatch.setattr(changeflow.worker.consumer, "get_db", down)
    message, hub, timer = FakeMessage(old_body()), FakeHub(), FakeTimer()
    # hub: prefork/threads (an event loop); green: gevent (no hub, the pool's greenlet timer).
    consumer = SimpleNamespace(
        hub=hub if loop == "hub" else None, timer=timer, pool=SimpleNamespace(is_green=loop == "green")
    )
    Consumer.on_decode_error(consumer, message, DecodeError("x"))  # type: ignore[arg-type]
    assert not message.acked
    if loop != "none":  # later, so that a MongoDB outage is no busy loop
        [(delay, function, args)] = hub.later if loop == "hub" else timer.later
        assert delay == UNDECODABLE_REQUEUE_SECONDS
        assert message.rejected == []
        function(*args)
    assert message.rejected == [True]
