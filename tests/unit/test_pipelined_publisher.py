"""PipelinedPublisher without a broker: a recording Redis client stands in for redis-py."""

from __future__ import annotations

import base64
import json
import random
import re
from typing import Any

import pytest
import redis
from bson import Decimal128, ObjectId
from celery import Celery

from changeflow.listener.pipelined import LPUSH_CHUNK, PipelinedPublisher, summary_argsrepr
from changeflow.listener.publish import BrokerUnavailable, Message, messages_for
from changeflow.worker.app import celery_config
from changeflow.worker.settings import Settings
from tests.card import card_routes

ROUTES = card_routes()  # this repository's app (tasks/): the card's routes


class FakeConnection:
    """Records what redis-py's Connection would send and read; `replies` scripts the answers."""

    def __init__(self, client: FakeRedis) -> None:
        self.client = client
        self.commands: list[tuple[Any, ...]] = []
        self.steps: list[str] = []  # "send" / "read", in order
        self.disconnected = False

    def send_command(self, *args: Any) -> None:
        if self.client.down:
            raise redis.exceptions.ConnectionError("connection refused")
        self.commands.append(tuple(arg.lower() if i == 0 else arg for i, arg in enumerate(args)))
        self.steps.append("send")

    def send_packed_command(self, chunks: list[bytes]) -> None:
        self.send_command(*parse_resp(b"".join(chunks)))

    def read_response(self) -> Any:
        self.steps.append("read")
        reply = self.client.replies.pop(0) if self.client.replies else 1
        if isinstance(reply, Exception):
            raise reply
        return reply

    def disconnect(self) -> None:
        self.disconnected = True


def parse_resp(data: bytes) -> list[str]:
    """One RESP command (an array of bulk strings) back into its arguments."""
    header, _, rest = data.partition(b"\r\n")
    assert header.startswith(b"*"), data[:20]
    args = []
    for _ in range(int(header[1:])):
        length_line, _, rest = rest.partition(b"\r\n")
        length = int(length_line[1:])
        args.append(rest[:length].decode())
        assert rest[length : length + 2] == b"\r\n"
        rest = rest[length + 2 :]
    assert rest == b"", "one command per send"
    return args


class FakePool:
    def __init__(self, client: FakeRedis) -> None:
        self.client = client

    def get_connection(self) -> FakeConnection:
        connection = FakeConnection(self.client)
        self.client.connections.append(connection)
        return connection

    def release(self, connection: FakeConnection) -> None:
        if connection.commands:
            self.client.round_trips.append(connection.commands)


class FakeRedis:
    """Stands in for redis.Redis: a pool of recording connections; `round_trips` holds the commands of
    each publish, `down` makes sending fail, `replies` scripts the replies (an exception: an error reply)."""

    def __init__(self) -> None:
        self.round_trips: list[list[tuple[Any, ...]]] = []
        self.connections: list[FakeConnection] = []
        self.replies: list[Any] = []
        self.down = False
        self.connection_pool = FakePool(self)


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
    messages = [m for i in range(10) for m in messages_for(event(i), ROUTES)]
    assert PipelinedPublisher(make_app(sent_events=False), client=client).publish(messages) == []  # type: ignore[arg-type]
    (commands,) = client.round_trips
    assert [c[:2] for c in commands] == [("lpush", "celery")]
    ids = [json.loads(value)["headers"]["id"] for value in commands[0][2:]]
    assert ids == [m.task_id for m in messages]


def test_commands_go_out_as_they_are_built_and_every_reply_is_read_before_publish_returns() -> None:
    client = FakeRedis()
    messages = [m for i in range(200) for m in messages_for(event(i), ROUTES)]  # 400 messages: 4 LPUSH chunks
    PipelinedPublisher(make_app(), client=client).publish(messages)  # type: ignore[arg-type]
    (connection,) = client.connections
    assert [c[0] for c in connection.commands] == ["lpush"] * 4 + ["publish"]  # sent events last
    assert connection.steps == ["send"] * 5 + ["read"] * 5  # one round trip's wait, at the end
    assert not connection.disconnected


def test_an_error_reply_is_broker_unavailable_and_drops_the_connection() -> None:
    client = FakeRedis()
    client.replies = [1, redis.exceptions.ResponseError("OOM command not allowed")]
    messages = [m for i in range(100) for m in messages_for(event(i), ROUTES)]
    with pytest.raises(BrokerUnavailable, match="OOM"):
        PipelinedPublisher(make_app(), client=client).publish(messages)  # type: ignore[arg-type]
    (connection,) = client.connections
    assert connection.disconnected  # its unread replies would answer the next batch's commands


def test_a_failure_half_way_drops_the_connection_and_propagates() -> None:
    client = FakeRedis()
    publisher = PipelinedPublisher(make_app(sent_events=False), client=client)  # type: ignore[arg-type]
    messages = [m for i in range(100) for m in messages_for(event(i), ROUTES)]  # 200 messages: 2 chunks
    built = 0

    def summary(payload: dict[str, Any]) -> str:
        nonlocal built
        built += 1
        if built == 80:  # after the first chunk (128 messages, 64 events) went out
            raise RuntimeError("a bug")
        return "[...]"

    publisher._argsrepr = summary  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug"):
        publisher.publish(messages)
    (connection,) = client.connections
    assert [c[0] for c in connection.commands] == ["lpush"] and connection.disconnected


def test_sent_events_go_grouped_in_the_same_round_trip() -> None:
    client = FakeRedis()
    messages = messages_for(event(1), ROUTES)
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
    payload = messages_for(event(1), ROUTES)[0].payload
    messages = [Message("tasks.create_profile", f"id-{i}", payload) for i in range(LPUSH_CHUNK + 5)]
    PipelinedPublisher(make_app(sent_events=False), client=client).publish(messages)  # type: ignore[arg-type]
    (commands,) = client.round_trips
    assert [len(c) - 2 for c in commands] == [LPUSH_CHUNK, 5]
    assert client.connections[0].steps == ["send", "send", "read", "read"]


def test_an_unserializable_payload_is_rejected_not_raised() -> None:
    client = FakeRedis()
    bad = event(2)
    bad["fullDocument"]["pattern"] = re.compile("^x")  # not BSON
    messages = messages_for(event(1), ROUTES) + messages_for(bad, ROUTES)
    rejected = PipelinedPublisher(make_app(sent_events=False), client=client).publish(messages)  # type: ignore[arg-type]
    assert [r.message for r in rejected] == messages_for(bad, ROUTES)
    assert "fullDocument.pattern" in rejected[0].error and rejected[0].traceback
    assert len(client.round_trips[0][0]) - 2 == len(messages_for(event(1), ROUTES))


def test_nothing_to_send_is_no_round_trip() -> None:
    client = FakeRedis()
    bad = event(2)
    bad["fullDocument"]["pattern"] = re.compile("^x")  # not BSON
    publisher = PipelinedPublisher(make_app(), client=client)  # type: ignore[arg-type]
    assert publisher.publish([]) == []
    assert len(publisher.publish(messages_for(bad, ROUTES))) == 2
    assert client.round_trips == []


def test_a_redis_error_is_broker_unavailable() -> None:
    client = FakeRedis()
    client.down = True
    with pytest.raises(BrokerUnavailable):
        PipelinedPublisher(make_app(), client=client).publish(messages_for(event(1), ROUTES))  # type: ignore[arg-type]


def test_summary_argsrepr_names_the_event_not_the_document() -> None:
    e = event(7)
    summary = summary_argsrepr(messages_for(e, ROUTES)[0].payload)
    assert summary.startswith("[{'_id': {'_data': '82000007'}, 'operationType': 'insert', 'ns': ")
    assert "ObjectId(" in summary and summary.endswith(", ...}]")
    assert "email" not in summary


def test_the_body_is_the_registered_serializers() -> None:
    from kombu.serialization import dumps

    client = FakeRedis()
    messages = messages_for(event(4), ROUTES)
    PipelinedPublisher(make_app(sent_events=False), client=client).publish(messages)  # type: ignore[arg-type]
    (commands,) = client.round_trips
    body = ([messages[0].payload], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    for envelope in commands[0][2:]:
        assert base64.b64decode(json.loads(envelope)["body"]) == dumps(body, serializer="json")[2]


def test_keys_that_are_not_strings_are_written_as_the_json_module_writes_them() -> None:
    client = FakeRedis()
    e = event(3)
    e["fullDocument"]["counts"] = {1: "one", None: "none"}
    publisher = PipelinedPublisher(make_app(sent_events=False), client=client)  # type: ignore[arg-type]
    assert publisher.publish(messages_for(e, ROUTES)) == []
    (commands,) = client.round_trips
    body = json.loads(base64.b64decode(json.loads(commands[0][2])["body"]))
    assert body[0][0]["fullDocument"]["counts"] == {"1": "one", "null": "none"}


def test_types_the_serializer_does_not_know_are_rejected_with_their_path() -> None:
    client = FakeRedis()
    bad = event(2)
    bad["fullDocument"]["script"] = complex(1, 2)  # refused by changeflow.worker.serialization, with its path
    publisher = PipelinedPublisher(make_app(sent_events=False), client=client)  # type: ignore[arg-type]
    rejected = publisher.publish(messages_for(bad, ROUTES))
    assert len(rejected) == 2 and "fullDocument.script" in rejected[0].error


def test_the_fast_decimal128_text_is_bsons() -> None:
    from changeflow.worker.serialization import decimal128_str

    rnd = random.Random(128)
    values = [Decimal128(text) for text in ("-0", "1.50", "-1E-6176", "9.99E+6144", "NaN", "-sNaN", "Inf")]
    for _ in range(20_000):
        # Any 128 bits (NaNs, infinities, the other encoding, too large coefficients included) ...
        values.append(Decimal128.from_bid(rnd.getrandbits(128).to_bytes(16, "little")))
        # ... and canonical values of every length and exponent.
        coefficient, exponent = rnd.getrandbits(rnd.randint(0, 113)), rnd.randint(0, 12287)
        high = rnd.getrandbits(1) << 63 | exponent << 49 | coefficient >> 64
        values.append(Decimal128((high, coefficient & (2**64 - 1))))
    for value in values:
        assert decimal128_str(value) == str(value), value.bid.hex()


def test_json_with_holes_is_json_dumps_of_the_filled_value() -> None:
    from changeflow.listener.pipelined import _JsonHoles, json_number, json_string

    def value(id_: object, at: object, k: object) -> dict[str, Any]:
        return {"id": id_, "n": None, "nested": {"at": at, "again": [id_, "x"]}, "k": k}

    hole = _JsonHoles.hole
    template = _JsonHoles.of(value(hole("id"), hole("at"), hole("k")), ("id", "at", "k"))
    rnd = random.Random(7)
    strings = ["", "plain-id", 'quote " and \\ backslash', "é ☃ \U0001f600", "\x00\n\t\u2028", "{}%s{0}"]
    numbers: list[float] = [0, -1, 2**70, 0.0, -5.5, 1 / 3, 1e300, 1767225600.1234567, True]
    numbers += [float("nan"), -float("inf")] + [rnd.uniform(-1e12, 1e12) for _ in range(200)]
    numbers += [rnd.randint(-(2**64), 2**64) for _ in range(50)]
    for number in numbers:
        text, other = rnd.choice(strings), rnd.choice(strings)
        filled = template.fill((json_string(text), json_number(number), json_string(other)))
        assert filled == json.dumps(value(text, number, other))


@pytest.mark.parametrize("value", [{"id": "prefix-\x00changeflow:id\x00"}, {"id": "no hole"}])
def test_json_with_holes_refuses_holes_it_cannot_fill(value: dict[str, str]) -> None:
    from changeflow.listener.pipelined import _JsonHoles

    with pytest.raises(ValueError, match="not whole values"):
        _JsonHoles.of(value, ("id",))


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    import hiredis
    from redis.connection import Connection, PythonRespSerializer

    packer = PythonRespSerializer(6000, Connection().encoder.encode)
    for args in [
        ("LPUSH", "celery", "a", "", "x" * 7000, '{"k": "\\u00e9"}', "é ☃ \U0001f600"),
        ("PUBLISH", "/0.celeryev/task.multi", "[]"),
        ("LPUSH", "queue-é", "x"),
    ]:
        assert hiredis.pack_command(args) == b"".join(packer.pack(*args))


def test_a_batch_takes_consecutive_lamport_clock_values() -> None:
    from changeflow.listener.pipelined import reserve_clock

    client = FakeRedis()
    app = make_app()
    before = app.clock.forward()
    assert reserve_clock(app.clock, 1) == before + 1 and app.clock.value == before + 1
    messages = [m for i in range(3) for m in messages_for(event(i), ROUTES)]  # 6 messages
    PipelinedPublisher(app, client=client).publish(messages)  # type: ignore[arg-type]
    (commands,) = client.round_trips
    sent = json.loads(base64.b64decode(json.loads(commands[-1][2])["body"]))
    clocks = [e["clock"] for e in sent]
    # Consecutive, after the clock's value before (building a template ticks it: send_task's event).
    assert clocks == list(range(clocks[0], clocks[0] + 6)) and clocks[0] > before + 1
    assert app.clock.forward() == clocks[-1] + 1  # the next event comes after the batch's


def test_a_broker_it_cannot_use_is_named_without_its_password() -> None:
    app = Celery("changeflow-unit", set_as_current=False)
    # Settings refuse this URL already (changeflow.worker.settings); the publisher must not rely on that.
    app.conf.update({**celery_config(Settings()), "broker_url": "amqp://changeflow:s3cret-pw@rabbit:5672//"})
    publisher = PipelinedPublisher(app, client=FakeRedis())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs a Redis broker .*, got scheme 'amqp'") as refused:
        publisher.publish(messages_for(event(1), ROUTES))
    assert "s3cret-pw" not in str(refused.value)
