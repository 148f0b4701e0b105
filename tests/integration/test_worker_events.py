"""worker.consumer: a real `celery worker` sends every task event (what Flower shows), grouped per window.

Workers run `bench.noop_app` (worker.app plus a no-op task behind the dedup guard) against a private
redis-server; the events are read the way Flower's receiver gets them, from Redis pub/sub.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from celery import Celery

from changeflow.worker.app import celery_config
from changeflow.worker.settings import Settings
from harness.processes import ManagedProcess, worker_process
from harness.redis_server import RedisServer
from harness.task_events import TASK_EVENTS_PATTERN, task_events

TASK_EVENTS = ("task-received", "task-started", "task-succeeded")


class EventLog:
    """The task events workers publish: per task id the event types, and how many messages held them."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(TASK_EVENTS_PATTERN)
        self.types: dict[str, list[str]] = defaultdict(list)
        self.messages = 0

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.05)
            if message is None:
                continue
            events = [e for e in task_events(message["data"]) if e["type"] in TASK_EVENTS]
            if events:
                self.messages += 1
            for event in events:
                self.types[event["uuid"]].append(event["type"])

    def complete(self, task_ids: list[str]) -> bool:
        return all(sorted(self.types[t]) == sorted(TASK_EVENTS) for t in task_ids)

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@contextmanager
def noop_worker(
    redis_server: RedisServer, flush_ms: int
) -> Iterator[tuple[ManagedProcess, Celery, EventLog]]:
    env = {
        "CELERY_BROKER_URL": redis_server.url,
        "REDIS_URL": redis_server.url,
        "WORKER_EVENT_FLUSH_MS": str(flush_ms),
    }
    app = Celery("changeflow-test", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=redis_server.url)))
    app.conf.task_send_sent_event = False  # only the worker's events
    events = EventLog(redis_server.url)
    worker = worker_process(env, f"events{flush_ms}", app="bench.noop_app", concurrency=1).start(timeout=60)
    try:
        yield worker, app, events
    finally:
        worker.stop()
        events.close()
        app.close()


def send_noop(app: Celery) -> str:
    task_id = str(uuid.uuid4())
    app.send_task("tasks.noop", args=[{"_id": {"_data": task_id}}], task_id=task_id)
    return task_id


@pytest.mark.parametrize("flush_ms", [0, 300])
def test_every_task_event_arrives_grouped_per_window(redis_server: RedisServer, flush_ms: int) -> None:
    with noop_worker(redis_server, flush_ms) as (worker, app, events):
        task_ids = []
        for _ in range(20):  # a trickle: one task every 25 ms
            task_ids.append(send_noop(app))
            events.read(0.025)
        deadline = time.monotonic() + 20
        while not events.complete(task_ids) and time.monotonic() < deadline:
            events.read(0.2)
        assert events.complete(task_ids), worker.log_text()[-3000:]
        sent = 3 * len(task_ids)
        if flush_ms:
            # 20 tasks within ~0.5 s: a few windows, not a message per event.
            assert events.messages <= 10, events.messages
        else:
            # Celery's own: the buffer goes out on the loop's next turn, at a trickle nearly alone.
            assert events.messages >= sent // 3, events.messages


def test_a_stopping_worker_sends_the_events_its_window_holds(redis_server: RedisServer) -> None:
    with noop_worker(redis_server, 60_000) as (worker, app, events):
        task_id = send_noop(app)
        client = redis.Redis.from_url(redis_server.url)
        deadline = time.monotonic() + 20
        while not client.exists(f"changeflow:done:{task_id}") and time.monotonic() < deadline:
            time.sleep(0.05)
        client.close()
        assert time.monotonic() < deadline, worker.log_text()[-3000:]
        events.read(0.5)
        assert events.messages == 0  # still in the 60 s window
        assert worker.stop() == 0  # warm shutdown (SIGTERM)
        events.read(1.0)
        assert events.complete([task_id]), worker.log_text()[-3000:]
