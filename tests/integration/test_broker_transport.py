"""worker.broker: kombu's Redis transport with one client per channel, on a private redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Exchange, Queue

from changeflow.worker import broker
from harness.redis_server import RedisServer
from worker import app


@pytest.fixture
def connection(redis_server: RedisServer) -> Iterator[Connection]:
    broker.install()
    with Connection(redis_server.url) as conn:
        yield conn


def test_redis_urls_use_the_transport_and_keep_their_scheme(redis_server: RedisServer) -> None:
    with app.connection_for_write(redis_server.url) as conn:
        assert isinstance(conn.transport, broker.Transport)
        assert conn.as_uri().startswith("redis://")  # what Flower reads to find the queues


def test_a_channel_builds_one_client_and_follows_a_new_pool(
    connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel = connection.default_channel
    built: list[redis.Redis] = []
    original = channel._create_client
    monkeypatch.setattr(channel, "_create_client", lambda: built.append(original()) or built[-1])
    for _ in range(3):
        with channel.conn_or_acquire() as client:
            client.ping()
    assert len(built) == 1  # kombu's own channel would have built 3
    channel._disconnect_pools()  # what kombu does after a connection error
    with channel.conn_or_acquire() as client:
        client.ping()
    assert len(built) == 2 and built[1].connection_pool is channel.pool


def test_messages_acks_and_events_go_through(connection: Connection) -> None:
    queue = Queue("broker-test", Exchange("broker-test"), routing_key="broker-test")
    producer = connection.Producer()
    for n in range(3):
        producer.publish({"n": n}, exchange=queue.exchange, routing_key="broker-test", declare=[queue])
    channel = connection.default_channel
    got = []
    for _ in range(3):
        message = queue(channel).get(no_ack=False)
        assert message is not None
        got.append(message.payload["n"])
        message.ack()
    assert got == [0, 1, 2]
    client = redis.Redis.from_url(connection.as_uri(include_password=True))
    assert client.llen("broker-test") == 0 and client.hlen("unacked") == 0  # every ack reached Redis
    client.close()


def test_operations_resume_after_a_redis_restart(redis_server: RedisServer, connection: Connection) -> None:
    producer = connection.Producer()
    publish = connection.ensure(producer, producer.publish, max_retries=5)
    client = redis.Redis.from_url(redis_server.url)
    publish({"n": 1}, routing_key="broker-restart")  # the default exchange: straight to the list
    assert client.llen("broker-restart") == 1
    redis_server.restart()  # no AOF: the first message dies with the server
    publish({"n": 2}, routing_key="broker-restart")  # a new pool, a new client
    assert client.llen("broker-restart") == 1
    message = connection.default_channel.basic_get("broker-restart", no_ack=True)
    assert message is not None and message.payload == {"n": 2}
    client.close()


def test_closing_a_channel_whose_connection_is_gone_keeps_the_worker_alive(redis_server: RedisServer) -> None:
    """After a broker error Celery's consumer releases its connection; the channel, closing, restores its
    unacked messages with no connection left. kombu's own channel raised AttributeError there, which
    stopped the worker ("Unrecoverable error"); now it is a connection error, which closing ignores, and
    the message waits in the unacked hash for the visibility timeout."""
    broker.install()
    connection = Connection(redis_server.url)
    channel = connection.channel()
    queue = Queue("close-test", Exchange("close-test"), routing_key="close-test")
    connection.Producer(channel).publish(
        {"n": 1}, exchange=queue.exchange, routing_key="close-test", declare=[queue]
    )
    assert queue(channel).get(no_ack=False) is not None  # delivered, not acked
    channel._disconnect_pools()  # what a connection error does
    connection._do_close_transport()  # the consumer released the connection
    connection.maybe_close_channel(channel)  # raised AttributeError before
    client = redis.Redis.from_url(redis_server.url)
    assert client.hlen("unacked") == 1  # not lost: redelivered after the visibility timeout
    client.close()
