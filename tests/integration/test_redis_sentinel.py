"""Redis Sentinel for all three of changeflow's Redis users: a master, a replica and 3 sentinels.

The broker (kombu's Sentinel transport through changeflow.worker.broker, as the workers connect), the dedup
store and the listener's pipelined publisher reach the master the sentinels name, follow a failover to
the new one, and the publisher counts a batch as published only once a replica has it (WAIT).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import redis
from celery import Celery
from kombu import Exchange, Queue

from changeflow.listener.pipelined import PipelinedPublisher
from changeflow.listener.publish import BrokerUnavailable, Message
from changeflow.worker import broker
from changeflow.worker.app import celery_config
from changeflow.worker.dedup import DedupStore
from changeflow.worker.settings import Settings
from harness.redis_sentinel import RedisSentinelGroup

T = TypeVar("T")


@pytest.fixture
def group() -> Iterator[RedisSentinelGroup]:
    with RedisSentinelGroup(servers=2, sentinels=3) as started:
        yield started


def settings_of(group: RedisSentinelGroup) -> Settings:
    return Settings.from_env(group.env)


def app_for(group: RedisSentinelGroup) -> Celery:
    app = Celery("sentinel-test", set_as_current=False)
    app.conf.update(celery_config(settings_of(group)))
    app.conf.broker_connection_timeout = 2
    return app


def message(n: int) -> Message:
    return Message("tasks.create_profile", f"sentinel-task-{n}", {"_id": {"_data": f"{n:04x}"}})


def server_client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def until_it_works(
    action: Callable[[], T], errors: tuple[type[BaseException], ...], timeout: float = 60
) -> T:
    """`action()` once it stops raising `errors` (a failover in progress), as the callers' retries do."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except errors:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_all_three_reach_the_master_the_sentinels_name(
    group: RedisSentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    master = server_client(group.master().port)
    # The broker, as a worker's kombu connection makes it.
    broker.install()
    app = app_for(group)
    queue = Queue("sentinel-test", Exchange("sentinel-test"), routing_key="sentinel-test")
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, broker.SentinelTransport)
        # One synchronous client per channel, as on the plain Redis transport (changeflow/worker/broker.py).
        channel = connection.default_channel
        built: list[redis.Redis] = []
        original = channel._create_client
        monkeypatch.setattr(channel, "_create_client", lambda: built.append(original()) or built[-1])
        for _ in range(3):
            with channel.conn_or_acquire() as client:
                client.ping()
        assert len(built) == 1
        connection.Producer().publish(
            {"n": 1}, exchange=queue.exchange, routing_key="sentinel-test", declare=[queue]
        )
        assert master.llen("sentinel-test") == 1
        got = queue(connection.default_channel).get(no_ack=True)
        assert got is not None and got.payload == {"n": 1}
    app.close()
    # The dedup store.
    store = DedupStore.from_settings(settings_of(group))
    store.mark_done("sentinel-key", "owner")
    assert master.get("changeflow:done:sentinel-key") == b"ok"
    store.client.close()
    # The listener's publisher: on the master, and already on the replica when publish returns (WAIT).
    publisher = PipelinedPublisher(app_for(group))
    publisher.publish([message(1)])
    replica = next(s for s in group.servers if s.port != group.master().port)
    assert master.llen("celery") == 1 and server_client(replica.port).llen("celery") == 1
    publisher.close()


def test_the_publisher_refuses_a_batch_no_replica_confirmed(group: RedisSentinelGroup) -> None:
    publisher = PipelinedPublisher(app_for(group))
    publisher.publish([message(1)])
    replica = next(s for s in group.servers if s.port != group.master().port)
    replica.stop()
    with pytest.raises(BrokerUnavailable, match="no replica confirmed"):
        publisher.publish([message(2)])
    replica.start()  # it resyncs from the master
    until_it_works(lambda: publisher.publish([message(2)]), (BrokerUnavailable,))
    publisher.close()


def test_after_a_failover_all_three_reach_the_new_master(group: RedisSentinelGroup) -> None:
    publisher = PipelinedPublisher(app_for(group))
    store = DedupStore.from_settings(settings_of(group))
    publisher.publish([message(1)])
    store.mark_done("before", "owner")
    old_port = group.master().port
    victim = group.kill_master()
    with pytest.raises(BrokerUnavailable):
        publisher.publish([message(2)])  # the old master is gone; the listener would hold the batch
    new_port = group.wait_for_new_master(old_port)
    victim.start()  # back as the new master's replica (the sentinels reconfigure it), so WAIT can succeed
    until_it_works(lambda: publisher.publish([message(2)]), (BrokerUnavailable,))
    until_it_works(lambda: store.mark_done("after", "owner"), (redis.ConnectionError, redis.ReadOnlyError))
    new_master = server_client(new_port)
    assert new_master.llen("celery") >= 2  # the batch before the kill (replicated) and the one after
    assert (
        new_master.get("changeflow:done:before") == b"ok" and new_master.get("changeflow:done:after") == b"ok"
    )
    # The broker: a new kombu connection goes to the new master too.
    broker.install()
    app = app_for(group)
    with app.connection_for_write() as connection:
        until_it_works(
            lambda: connection.Producer().publish({"n": 2}, routing_key="after-failover"), (Exception,)
        )
    assert new_master.llen("after-failover") == 1
    app.close()
    publisher.close()
    store.client.close()
