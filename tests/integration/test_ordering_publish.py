"""The listener's side of per-key ordering on a private redis-server: both publishers send the
ordering headers, and the members are registered before the messages are published."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from bson import ObjectId
from celery import Celery
from pymongo.database import Database

from changeflow.listener.ordering import OrderingPublisher
from changeflow.listener.pipelined import PipelinedPublisher
from changeflow.listener.publish import BrokerUnavailable, CeleryPublisher, messages_for, record_unpublishable
from changeflow.listener.routes import FieldChanged, Route
from changeflow.worker.app import celery_config
from changeflow.worker.ordering import KEY_HEADER, MEMBER_HEADER, OrderBook
from changeflow.worker.serialization import register_bson_types
from changeflow.worker.settings import Settings
from harness.redis_server import RedisServer

ROUTES = (
    Route("orders", "update", ["t.notify"], when=FieldChanged("status"), ordered_by=True),
    Route("orders", "update", ["t.by_user"], ordered_by="fullDocument.user_id"),
    Route("orders", "update", ["t.plain"]),
)


def update(data: str, order_id: ObjectId, **document: Any) -> dict[str, Any]:
    return {
        "_id": {"_data": data},
        "operationType": "update",
        "ns": {"db": "changeflow", "coll": "orders"},
        "documentKey": {"_id": order_id},
        "fullDocument": {"_id": order_id, "status": "paid", **document},
        "updateDescription": {"updatedFields": {"status": "paid"}, "removedFields": []},
    }


@pytest.fixture
def celery_app(redis_server: RedisServer) -> Iterator[Celery]:
    register_bson_types()  # as a changeflow app does when it is created
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


def pop_headers(client: redis.Redis) -> dict[str, Any]:
    raw = client.rpop("celery")
    assert raw is not None, "no message in the queue"
    headers: dict[str, Any] = json.loads(raw)["headers"]
    return headers


@pytest.mark.parametrize("ordered_task", ["t.notify", "t.by_user"])
def test_both_publishers_send_the_same_ordering_headers(
    celery_app: Celery, client: redis.Redis, ordered_task: str
) -> None:
    messages = {m.task_name: m for m in messages_for(update("82AB", ObjectId(), user_id=5), ROUTES)}
    message = messages[ordered_task]
    assert message.order is not None
    assert CeleryPublisher(celery_app).publish([message]) == []
    reference = pop_headers(client)
    assert PipelinedPublisher(celery_app).publish([message]) == []
    fast = pop_headers(client)
    assert fast[KEY_HEADER] == reference[KEY_HEADER] == message.order.key
    assert fast[MEMBER_HEADER] == reference[MEMBER_HEADER] == "82AB"
    fast.pop("argsrepr"), reference.pop("argsrepr")
    assert list(fast.items()) == list(reference.items())  # same headers, same order, as send_task's
    # An unordered task's message has none.
    PipelinedPublisher(celery_app).publish([messages["t.plain"]])
    assert KEY_HEADER not in pop_headers(client)


def test_members_are_registered_before_the_batch_is_published(
    celery_app: Celery, client: redis.Redis
) -> None:
    book = OrderBook(client)
    seen_at_publish: list[list[str]] = []
    inner = PipelinedPublisher(celery_app)

    class Watching:
        def publish(self, messages: Any) -> Any:
            seen_at_publish.append(book.members("t.notify", messages[0].order.key))
            return inner.publish(messages)

    order_id = ObjectId()
    batch = [m for d in ("8201", "8202") for m in messages_for(update(d, order_id), ROUTES[:1])]
    assert OrderingPublisher(Watching(), book).publish(batch) == []
    assert seen_at_publish == [["8201", "8202"]]
    assert client.llen("celery") == 2


def test_an_event_without_a_key_is_an_unorderable_dead_letter(
    celery_app: Celery, client: redis.Redis, db: Database
) -> None:
    no_user = update("8201", ObjectId())  # fullDocument has no user_id
    messages = messages_for(no_user, ROUTES)
    rejected = OrderingPublisher(PipelinedPublisher(celery_app), OrderBook(client)).publish(messages)
    assert [(r.message.task_name, r.reason) for r in rejected] == [("t.by_user", "unorderable")]
    assert client.llen("celery") == 2  # the other tasks of the event went out
    record_unpublishable(db, rejected[0])
    letter = db["changeflow_dead_letters"].find_one({"_id": rejected[0].message.task_id})
    assert letter is not None and letter["reason"] == "unorderable"
    assert "fullDocument.user_id" in letter["error"]


def test_a_store_that_refuses_the_members_keeps_the_batch(
    celery_app: Celery, redis_server: RedisServer
) -> None:
    # The ordering store is another Redis that is down: nothing is published, the batch is retried.
    with RedisServer() as other:
        book = OrderBook(redis.Redis.from_url(other.url, socket_connect_timeout=1))
        other.stop()
        publisher = OrderingPublisher(PipelinedPublisher(celery_app), book)
        with pytest.raises(BrokerUnavailable, match="ordering store"):
            publisher.publish(messages_for(update("8201", ObjectId()), ROUTES[:1]))
    assert redis.Redis.from_url(redis_server.url).llen("celery") == 0
