"""Event -> messages, and the Celery publisher's split of errors (broker vs. one bad payload)."""

from __future__ import annotations

import re
from typing import Any

import mongomock
import pytest
from bson import ObjectId
from bson.regex import Regex
from celery import Celery

from changeflow.listener.publish import (
    BrokerUnavailable,
    CeleryPublisher,
    Rejected,
    messages_for,
    record_unpublishable,
    storable,
)
from changeflow.worker.app import celery_config
from changeflow.worker.keys import dedup_key
from changeflow.worker.serialization import check_serializable
from changeflow.worker.settings import Settings
from harness.ports import free_port
from tests.card import card_routes

ROUTES = card_routes()  # this repository's app (tasks/): the card's routes


def user_insert(data: str = "8201", **document: Any) -> dict[str, Any]:
    oid = ObjectId()
    return {
        "_id": {"_data": data},
        "operationType": "insert",
        "ns": {"db": "app", "coll": "users"},
        "documentKey": {"_id": oid},
        "fullDocument": {"_id": oid, "email": "a@example.com", **document},
        "lsid": {"id": "session"},
    }


def celery_app(broker_url: str) -> Celery:
    """An app configured exactly like worker.app, on another broker (memory://: not one the settings
    accept, so it is set after them)."""
    app = Celery("changeflow-test", set_as_current=False)
    app.conf.update({**celery_config(Settings()), "broker_url": broker_url})
    return app


def test_messages_share_the_trimmed_payload_and_use_dedup_keys() -> None:
    change = user_insert()
    messages = messages_for(change, ROUTES)
    # Route order follows the order the app's modules were imported in: compare names as a set.
    assert sorted(m.task_name for m in messages) == ["tasks.create_profile", "tasks.send_welcome_email"]
    assert [m.task_id for m in messages] == [dedup_key(change["_id"], m.task_name) for m in messages]
    assert messages[0].payload == messages[1].payload
    assert "lsid" not in messages[0].payload
    assert messages[0].payload["fullDocument"] == change["fullDocument"]


def test_unrouted_event_has_no_messages() -> None:
    assert messages_for({**user_insert(), "operationType": "delete"}, ROUTES) == []


def test_storable_reprs_only_what_the_serializer_refuses() -> None:
    oid = ObjectId()
    # No value pymongo decodes is refused any more: these are Python values that are not BSON.
    value = {"a": re.compile("^x"), "b": [1, complex(1, 2), {"c": oid, "r": Regex("^x", "i")}], "d": "text"}
    result = storable(value)
    assert result["a"] == repr(re.compile("^x"))
    assert result["b"] == [1, repr(complex(1, 2)), {"c": oid, "r": Regex("^x", "i")}]  # BSON types: kept
    assert result["d"] == "text"


def test_publisher_rejects_only_the_unserializable_message() -> None:
    app = celery_app("memory://")
    good = messages_for(user_insert("8201"), ROUTES)
    bad = messages_for(user_insert("8202", pattern=re.compile("^a")), ROUTES)
    rejected = CeleryPublisher(app).publish([*good, *bad])
    assert [r.message for r in rejected] == bad
    assert all("EncodeError" in r.error or "Unserializable" in r.error for r in rejected)
    assert all(r.traceback for r in rejected)

    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("celery")
        sent = [queue.get(timeout=1) for _ in good]
        assert queue.qsize() == 0
        queue.close()
    assert [m.headers["id"] for m in sent] == [m.task_id for m in good]
    assert [m.headers["task"] for m in sent] == [m.task_name for m in good]
    args, kwargs, _embed = sent[0].decode()
    assert args == [good[0].payload] and kwargs == {}


def test_broker_outage_raises_broker_unavailable() -> None:
    app = celery_app(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    app.conf.broker_connection_timeout = 0.2
    with pytest.raises(BrokerUnavailable):
        CeleryPublisher(app).publish(messages_for(user_insert(), ROUTES))


def test_empty_batch_does_not_touch_the_broker() -> None:
    app = celery_app(f"redis://127.0.0.1:{free_port()}/0")
    assert CeleryPublisher(app).publish([]) == []


def test_unpublishable_message_becomes_a_storable_dead_letter() -> None:
    db = mongomock.MongoClient().db
    change = user_insert(pattern=re.compile("^a"))
    (message,) = [m for m in messages_for(change, ROUTES) if m.task_name == "tasks.send_welcome_email"]
    record_unpublishable(db, Rejected(message, "EncodeError: cannot serialize", "Traceback ...\nEncodeError"))
    letter = db.changeflow_dead_letters.find_one({"_id": message.task_id})
    assert letter is not None
    assert letter["reason"] == "unpublishable"
    assert letter["task"] == "tasks.send_welcome_email"
    assert letter["attempts"] == 1
    assert letter["payload"]["fullDocument"]["pattern"] == repr(re.compile("^a"))
    assert letter["payload"]["fullDocument"]["email"] == "a@example.com"
    check_serializable(letter["payload"])  # a replay can send the stored payload as it is
