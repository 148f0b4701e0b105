"""PipelinedPublisher without a broker: a recording Redis client stands in for redis-py."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from typing import Any

import pytest
import redis
from bson import Binary, Decimal128, Int64, ObjectId, Timestamp
from bson.code import Code
from bson.regex import Regex
from bson.son import SON
from celery import Celery

from listener.pipelined import LPUSH_CHUNK, PipelinedPublisher, summary_argsrepr
from listener.publish import BrokerUnavailable, Message, messages_for
from worker.app import celery_config
from worker.settings import Settings


class Pipeline:
    def __init__(self, client: FakeRedis) -> None:
        self.client = client
        self.commands: list[tuple[Any, ...]] = []

    def lpush(self, key: str, *values: str) -> None:
        self.commands.append(("lpush", key, *values))

    def publish(self, channel: str, message: str) -> None:
        self.commands.append(("publish", channel, message))

    def execute(self) -> list[Any]:
        if self.client.down:
            raise redis.exceptions.ConnectionError("connection refused")
        self.client.round_trips.append(self.commands)
        return [1] * len(self.commands)


class FakeRedis:
    def __init__(self) -> None:
        self.round_trips: list[list[tuple[Any, ...]]] = []
        self.down = False

    def pipeline(self, transaction: bool = True) -> Pipeline:
        assert transaction is False
        return Pipeline(self)


def make_app(sent_events: bool = True) -> Celery:
    app = Celery("changeflow-unit", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url="redis://127.0.0.1:1/0")))
    app.conf.task_send_sent_event = sent_events
    return app


def event(i: int, coll: str = "users") -> dict[str, Any]:
    doc = {"_id": ObjectId(), "email": f"u{i}@example.test"}
    return {
        "_id": {"_data": f"82{i:06X}"},
        "operationType": "insert",
        "ns": {"db": "changeflow", "coll": coll},
        "documentKey": {"_id": doc["_id"]},
        "fullDocument": doc,
    }


def test_a_batch_is_one_round_trip_with_one_lpush() -> None:
    client = FakeRedis()
    messages = [m for i in range(10) for m in messages_for(event(i))]
    assert PipelinedPublisher(make_app(sent_events=False), client=client).publish(messages) == []  # type: ignore[arg-type]
    (commands,) = client.round_trips
    assert [c[:2] for c in commands] == [("lpush", "celery")]
    ids = [json.loads(value)["headers"]["id"] for value in commands[0][2:]]
    assert ids == [m.task_id for m in messages]


def test_sent_events_go_grouped_in_the_same_round_trip() -> None:
    client = FakeRedis()
    messages = messages_for(event(1))
    PipelinedPublisher(make_app(), client=client).publish(messages)  # type: ignore[arg-type]
    (commands,) = client.round_trips
    published = [c for c in commands if c[0] == "publish"]
    assert [c[1] for c in published] == ["/0.celeryev/task.multi"]  # one grouped message per batch
    sent = json.loads(base64.b64decode(json.loads(published[0][2])["body"]))
    assert [(e["type"], e["uuid"], e["name"]) for e in sent] == [
        ("task-sent", m.task_id, m.task_name) for m in messages
    ]


def test_large_batches_are_split_into_lpush_chunks() -> None:
    client = FakeRedis()
    payload = messages_for(event(1))[0].payload
    messages = [Message("tasks.create_profile", f"id-{i}", payload) for i in range(LPUSH_CHUNK + 5)]
    PipelinedPublisher(make_app(sent_events=False), client=client).publish(messages)  # type: ignore[arg-type]
    (commands,) = client.round_trips
    assert [len(c) - 2 for c in commands] == [LPUSH_CHUNK, 5]


def test_an_unserializable_payload_is_rejected_not_raised() -> None:
    client = FakeRedis()
    bad = event(2)
    bad["fullDocument"]["pattern"] = Regex("^x")
    messages = messages_for(event(1)) + messages_for(bad)
    rejected = PipelinedPublisher(make_app(sent_events=False), client=client).publish(messages)  # type: ignore[arg-type]
    assert [r.message for r in rejected] == messages_for(bad)
    assert "fullDocument.pattern" in rejected[0].error and rejected[0].traceback
    assert len(client.round_trips[0][0]) - 2 == len(messages_for(event(1)))


def test_nothing_to_send_is_no_round_trip() -> None:
    client = FakeRedis()
    bad = event(2)
    bad["fullDocument"]["pattern"] = Regex("^x")
    publisher = PipelinedPublisher(make_app(), client=client)  # type: ignore[arg-type]
    assert publisher.publish([]) == []
    assert len(publisher.publish(messages_for(bad))) == 2
    assert client.round_trips == []


def test_a_redis_error_is_broker_unavailable() -> None:
    client = FakeRedis()
    client.down = True
    with pytest.raises(BrokerUnavailable):
        PipelinedPublisher(make_app(), client=client).publish(messages_for(event(1)))  # type: ignore[arg-type]


def test_summary_argsrepr_names_the_event_not_the_document() -> None:
    e = event(7)
    summary = summary_argsrepr(messages_for(e)[0].payload)
    assert summary.startswith("[{'_id': {'_data': '82000007'}, 'operationType': 'insert', 'ns': ")
    assert "ObjectId(" in summary and summary.endswith(", ...}]")
    assert "email" not in summary


def test_the_fast_body_encoder_matches_the_registered_serializer() -> None:
    from kombu.serialization import dumps

    import worker.app  # noqa: F401  (registers the BSON types)
    from listener.pipelined import fast_json_matches, plain_json

    assert fast_json_matches()
    payloads = [messages_for(event(i, coll))[0].payload for i in range(20) for coll in ("users",)] + [
        {"k": Int64(2**40), "nested": [{"a": Decimal128("1E+3")}, ("t", b"\x80")], "u": uuid.uuid4()},
        {
            "when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            "bin": Binary(b"\x01\x02", 0),
            "ts": Timestamp(1, 2),
        },
        SON([("b", 1), ("a", ObjectId())]),
    ]
    for payload in payloads:
        body = ([payload], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
        assert json.dumps(plain_json(body)) == dumps(body, serializer="json")[2]


def test_types_the_fast_encoder_does_not_know_go_to_the_serializer() -> None:
    client = FakeRedis()
    bad = event(2)
    bad["fullDocument"]["script"] = Code("return 1")  # refused by worker.serialization, with its path
    rejected = PipelinedPublisher(make_app(sent_events=False), client=client).publish(messages_for(bad))  # type: ignore[arg-type]
    assert len(rejected) == 2 and "fullDocument.script" in rejected[0].error
