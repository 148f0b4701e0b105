"""PipelinedPublisher on a private redis-server: the messages send_task sends, consumed by a real worker.

The equivalence test publishes one message through `app.send_task` and one through the pipelined
publisher and compares what lands in Redis, decoded, field by field. Only what is legitimately
different may differ: the delivery tag (a fresh uuid per message), argsrepr (a summary, on purpose),
and in the task-sent event the logical clock and timestamp.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from bson import Decimal128, Int64, ObjectId, Timestamp
from celery import Celery
from kombu.serialization import loads
from pymongo.database import Database

from changeflow import Changeflow
from changeflow.listener.backpressure import BrokerQueueLength
from changeflow.listener.pipelined import PipelinedPublisher
from changeflow.listener.publish import BrokerUnavailable, CeleryPublisher, messages_for, task_queues
from changeflow.worker.app import celery_config
from changeflow.worker.settings import Settings
from harness.processes import worker_process
from harness.redis_server import RedisServer
from harness.smtp_sink import SmtpSink
from tests.card import card_routes

ROUTES = card_routes()  # this repository's app (tasks/): the card's routes


def change_event(data: str = "8263AB01") -> dict[str, Any]:
    user = ObjectId()
    return {
        "_id": {"_data": data},
        "operationType": "insert",
        "clusterTime": Timestamp(1_700_000_000, 1),
        "wallTime": dt.datetime(2026, 1, 2, 3, 4, 5, 678000),
        "ns": {"db": "changeflow", "coll": "users"},
        "documentKey": {"_id": user},
        "fullDocument": {
            "_id": user, "email": "ada@example.test", "name": "Ada", "visits": Int64(3),
            "balance": Decimal128("1.50"),
        },
    }  # fmt: skip


@pytest.fixture
def celery_app(redis_server: RedisServer) -> Iterator[Celery]:
    """Configured like worker.app (same serializer, message format, sent events) on this test's Redis."""
    app = Celery("changeflow-test", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=redis_server.url)))
    app.conf.broker_connection_timeout = 1
    yield app
    app.close()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def pop_envelope(client: redis.Redis) -> dict[str, Any]:
    raw = client.rpop("celery")
    assert raw is not None, "no message in the queue"
    envelope: dict[str, Any] = json.loads(raw)
    return envelope


def decode_body(envelope: dict[str, Any]) -> Any:
    return loads(base64.b64decode(envelope["body"]), envelope["content-type"], envelope["content-encoding"])


def test_messages_match_send_task(celery_app: Celery, client: redis.Redis) -> None:
    event = change_event()
    (message, *_) = messages_for(event, ROUTES)
    celery_app.send_task(
        message.task_name, args=[message.payload], task_id=message.task_id, retry=False, add_to_parent=False
    )
    reference = pop_envelope(client)
    publisher = PipelinedPublisher(celery_app)
    assert publisher.publish([message]) == []
    fast = pop_envelope(client)

    # The body (args, kwargs, embed) is byte for byte the same, BSON types included.
    assert fast["body"] == reference["body"]
    assert decode_body(fast)[0] == [message.payload]
    assert list(fast) == list(reference)  # the same envelope keys, in the same order
    for key in ("content-encoding", "content-type"):
        assert fast[key] == reference[key]
    # Headers: all the same but argsrepr, a summary of the event instead of a repr of the whole payload.
    assert fast["headers"].pop("argsrepr").startswith(reference["headers"].pop("argsrepr")[:60])
    assert fast["headers"] == reference["headers"]
    assert list(fast["headers"]) == list(reference["headers"])
    assert fast["headers"]["id"] == message.task_id
    # Properties: all the same but the delivery tag.
    assert fast["properties"].pop("delivery_tag") != reference["properties"].pop("delivery_tag")
    assert fast["properties"] == reference["properties"]
    assert list(fast["properties"]) == list(reference["properties"])


def test_exact_argsrepr_matches_send_task(celery_app: Celery, client: redis.Redis) -> None:
    (message, *_) = messages_for(change_event(), ROUTES)
    celery_app.send_task(
        message.task_name, args=[message.payload], task_id=message.task_id, retry=False, add_to_parent=False
    )
    reference = pop_envelope(client)
    PipelinedPublisher(celery_app, exact_argsrepr=True).publish([message])
    assert pop_envelope(client)["headers"] == reference["headers"]


def test_task_sent_events_match(celery_app: Celery, client: redis.Redis) -> None:
    """send_task's task-sent event, and the pipelined one: the same event, grouped like Celery's buffers."""
    (message, *_) = messages_for(change_event(), ROUTES)
    pubsub = client.pubsub()
    pubsub.psubscribe("*celeryev*")
    assert pubsub.get_message(timeout=2) is not None  # the subscription confirmation

    def next_event() -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got = pubsub.get_message(timeout=1)
            if got and got["type"] == "pmessage":
                envelope = json.loads(got["data"])
                envelope["channel"] = got["channel"]
                envelope["event"] = json.loads(base64.b64decode(envelope.pop("body")))
                return envelope
        raise AssertionError("no task-sent event")

    celery_app.send_task(
        message.task_name, args=[message.payload], task_id=message.task_id, retry=False, add_to_parent=False
    )
    reference = next_event()
    PipelinedPublisher(celery_app).publish([message])
    fast = next_event()
    pubsub.close()

    # One message per batch, on the routing key of Celery's grouped events, holding a list of events.
    assert reference["channel"] == b"/0.celeryev/task.sent"
    assert fast["channel"] == b"/0.celeryev/task.multi"
    (event,) = fast.pop("event")
    expected = reference.pop("event")
    for fields in (event, expected):
        for field in ("clock", "timestamp", "args"):  # a logical clock, a time, and the argsrepr
            fields.pop(field)
    assert event == expected
    assert event["uuid"] == message.task_id and event["type"] == "task-sent"
    for envelope in (fast, reference):
        envelope.pop("channel")
        envelope["properties"].pop("delivery_tag")
        envelope["properties"]["delivery_info"].pop("routing_key")
    assert fast == reference


def test_celery_event_receivers_see_each_task_sent_event(celery_app: Celery) -> None:
    """What Flower uses (celery.events.EventReceiver) gets one task-sent event per message."""
    messages = messages_for(change_event(), ROUTES) + messages_for(change_event("8263AB02"), ROUTES)
    seen: list[dict[str, Any]] = []
    ready = threading.Event()
    with celery_app.connection_for_read() as connection:
        receiver = celery_app.events.Receiver(connection, handlers={"task-sent": seen.append})

        def consume() -> None:
            ready.set()
            receiver.capture(limit=len(messages), timeout=10, wakeup=False)

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        ready.wait(5)
        time.sleep(0.5)  # let the receiver subscribe before publishing
        PipelinedPublisher(celery_app).publish(messages)
        thread.join(15)
    assert [e["uuid"] for e in seen] == [m.task_id for m in messages]
    assert {e["name"] for e in seen} == {m.task_name for m in messages}


def test_a_batch_is_pushed_in_order_and_unserializable_messages_are_rejected(
    celery_app: Celery, client: redis.Redis
) -> None:
    events = [change_event(f"82{i:04X}") for i in range(5)]
    events[2]["fullDocument"]["pattern"] = re.compile("^a")  # not BSON: the serializer refuses it
    messages = [message for event in events for message in messages_for(event, ROUTES)]
    rejected = PipelinedPublisher(celery_app).publish(messages)

    assert [r.message.payload["_id"] for r in rejected] == [events[2]["_id"]] * 2
    assert "fullDocument.pattern" in rejected[0].error
    sent = [json.loads(client.rpop("celery"))["headers"]["id"] for _ in range(client.llen("celery"))]
    assert sent == [m.task_id for m in messages if m.payload["_id"] != events[2]["_id"]]


def test_a_stopped_broker_raises_broker_unavailable(celery_app: Celery, redis_server: RedisServer) -> None:
    publisher = PipelinedPublisher(celery_app)
    messages = messages_for(change_event(), ROUTES)
    assert publisher.publish(messages) == []
    redis_server.stop()
    with pytest.raises(BrokerUnavailable):
        publisher.publish(messages)
    redis_server.start()
    assert publisher.publish(messages) == []  # and it recovers once the broker is back


def test_a_real_worker_runs_the_tasks(redis_server: RedisServer, mongodb_uri: str, db: Database) -> None:
    """A `celery -A worker worker` process consumes the pipelined messages and marks their keys done."""
    with SmtpSink(port=0) as sink:
        env = {
            "CELERY_BROKER_URL": redis_server.url,
            "REDIS_URL": redis_server.url,
            "MONGODB_URI": mongodb_uri,
            "MONGODB_DB": db.name,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(sink.port),
        }
        app = Celery("changeflow-test", set_as_current=False)
        app.conf.update(celery_config(Settings(celery_broker_url=redis_server.url)))
        event = change_event(f"82{uuid.uuid4().hex[:8].upper()}")
        messages = messages_for(event, ROUTES)
        assert PipelinedPublisher(app).publish(messages) == []
        worker = worker_process(env, "pipelined", concurrency=1).start(timeout=60)
        try:
            client = redis.Redis.from_url(redis_server.url)
            keys = [f"changeflow:done:{m.task_id}" for m in messages]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and client.exists(*keys) < len(keys):
                time.sleep(0.1)
            assert client.exists(*keys) == len(keys), worker.log_text()[-3000:]
            assert db.profiles.count_documents({}) == 1
        finally:
            worker.stop()
            app.close()


@pytest.mark.parametrize("publisher_class", [PipelinedPublisher, CeleryPublisher])
def test_a_task_with_its_own_queue_lands_in_that_queue(
    redis_server: RedisServer, client: redis.Redis, publisher_class: type[Any]
) -> None:
    app = Changeflow("queues", settings=Settings(celery_broker_url=redis_server.url), package="")

    @app.on("users", "insert", name="q.slow", queue="slow")
    def slow(event: dict[str, Any]) -> None: ...

    @app.on("users", "insert", name="q.plain")
    def plain(event: dict[str, Any]) -> None: ...

    try:
        messages = messages_for(change_event(), app.routes)
        assert publisher_class(app).publish(messages) == []
        assert (client.llen("celery"), client.llen("slow")) == (1, 1)
        slow_message = json.loads(client.lindex("slow", 0))
        assert slow_message["headers"]["task"] == "q.slow"
        assert json.loads(client.lindex("celery", 0))["headers"]["task"] == "q.plain"
        # The listener's queue bound counts every queue its routes' tasks go to.
        length = BrokerQueueLength(app, task_queues(app, ["q.plain", "q.slow"]))
        try:
            assert length() == 2
        finally:
            length.close()
    finally:
        app.close()


# -- byte for byte against send_task, for each setting that changes a message -----------------------
def _settings_app(redis_url: str, setting: str) -> Celery:
    """A Celery app configured like worker.app, with one task, and `setting` applied."""
    from kombu import Queue

    app = Celery("changeflow-bytes", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=redis_url)))
    task_options: dict[str, Any] = {"time_limit": 60, "soft_time_limit": 30}  # as the card's tasks have
    if setting == "task priority":
        task_options["priority"] = 5
    elif setting == "default priority":
        app.conf.task_default_priority = 5
    elif setting == "task ignore_result":
        task_options["ignore_result"] = True
    elif setting == "queue x-expires":
        app.conf.task_queues = [Queue("celery", queue_arguments={"x-expires": 60_000})]
    elif setting == "queue max priority":
        app.conf.task_queues = [Queue("celery", max_priority=10)]
    elif setting == "task protocol 1":
        app.conf.task_protocol = 1
    elif setting == "task-sent events off":
        app.conf.task_send_sent_event = False
    elif setting == "transient delivery":
        app.conf.task_default_delivery_mode = "transient"
    elif setting == "compression":
        app.conf.task_compression = "gzip"

    def noop(event: dict[str, Any]) -> None: ...

    app.task(name="bytes.task", shared=False, **task_options)(noop)
    app.finalize()  # as a loaded app is: send_task then reads the task's options (time limits, priority)
    return app


REPRODUCED = {
    "defaults",
    "task ignore_result",
    "task-sent events off",
    "transient delivery",
    "ordering headers",
    "ordering and trace headers",
}
DELIVERY_TAG = re.compile(rb'"delivery_tag": "[^"]*"')


def _queued(client: redis.Redis) -> dict[bytes, list[bytes]]:
    """Every list in Redis with its values, the delivery tag (unique per message on both paths) blanked."""
    lists = {key: client.lrange(key, 0, -1) for key in client.keys("*") if client.type(key) == b"list"}
    return {
        key: [DELIVERY_TAG.sub(b'"delivery_tag": ""', v) for v in values] for key, values in lists.items()
    }


@pytest.mark.parametrize(
    "setting",
    [
        "defaults", "task priority", "default priority", "task ignore_result", "queue x-expires",
        "queue max priority", "task protocol 1", "task-sent events off", "transient delivery", "compression",
        "ordering headers",
        "ordering and trace headers",
    ],
)  # fmt: skip
def test_the_bytes_in_redis_are_send_tasks(
    redis_server: RedisServer, client: redis.Redis, setting: str
) -> None:
    """What lands in Redis is byte for byte what CeleryPublisher (send_task) writes, for each setting:
    the fast path reproduces it, or sends that task through send_task. Only the delivery tag differs."""
    from changeflow.listener.publish import Message
    from changeflow.worker.ordering import Order

    app = _settings_app(redis_server.url, setting)
    try:
        payload = task_payload_of(change_event())
        order = (
            Order("users:1", "m-1") if setting in ("ordering headers", "ordering and trace headers") else None
        )
        trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        headers = trace if setting == "ordering and trace headers" else None
        message = Message("bytes.task", "id-1", payload, order, "documentKey._id" if order else None, headers)
        client.flushdb()
        assert CeleryPublisher(app).publish([message]) == []
        reference = _queued(client)
        ttl = {key: client.pttl(key) for key in reference}
        client.flushdb()
        publisher = PipelinedPublisher(app, exact_argsrepr=True)
        assert publisher.publish([message]) == []
        assert _queued(client) == reference
        # The settings the templates reproduce stay on the fast path; the others go through send_task.
        assert list(publisher._fast.values()) == [setting in REPRODUCED], publisher._fast
        assert {key: client.pttl(key) > 0 for key in reference} == {key: t > 0 for key, t in ttl.items()}
    finally:
        app.close()


def task_payload_of(event: dict[str, Any]) -> dict[str, Any]:
    from changeflow.listener.payload import task_payload

    return task_payload(event)
