"""The listener's metrics: counting, lag (idle vs behind), checkpoint age and oplog headroom."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pymongo
from bson import Timestamp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pymongo.database import Database

from changeflow.listener.metrics import ListenerMetrics, event_time, lag_seconds, oldest_oplog_time
from changeflow.listener.publish import Message, Rejected
from harness.metrics import Samples

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def samples(metrics: ListenerMetrics) -> Samples:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(metrics: ListenerMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def event(coll: str, op: str, wall: datetime) -> dict:
    return {"ns": {"db": "d", "coll": coll}, "operationType": op, "wallTime": wall.replace(tzinfo=None)}


def test_lag_is_zero_when_caught_up_and_the_age_of_the_newest_event_otherwise() -> None:
    assert lag_seconds(T0, None, caught_up=False) == 0
    assert lag_seconds(T0 + timedelta(seconds=3), T0, caught_up=False) == 3
    assert lag_seconds(T0 + timedelta(seconds=3), T0, caught_up=True) == 0
    assert lag_seconds(T0, T0 + timedelta(seconds=1), caught_up=False) == 0  # clocks apart: never below 0


def test_event_time_is_the_wall_time_else_the_cluster_time() -> None:
    assert event_time({"wallTime": T0.replace(tzinfo=None)}) == T0
    assert event_time({"clusterTime": Timestamp(int(T0.timestamp()), 1)}) == T0
    assert event_time({}) is None


def test_counts_events_tasks_batches_and_dead_letters() -> None:
    metrics = ListenerMetrics("s", CollectorRegistry(), clock=Clock())
    metrics.read(
        [event("users", "insert", T0), event("users", "insert", T0), event("orders", "update", T0)],
        idle=False,
    )
    metrics.read([], idle=True)
    messages = [Message("a", "1", {}), Message("b", "2", {}), Message("a", "3", {})]
    metrics.published(messages, [Rejected(messages[2], "e", "tb")], 0.01)
    metrics.dead_lettered("a")
    assert get(metrics, "changeflow_listener_events_total", collection="users", operation="insert") == 2
    assert get(metrics, "changeflow_listener_events_total", collection="orders", operation="update") == 1
    assert get(metrics, "changeflow_listener_tasks_published_total", task="a") == 1
    assert get(metrics, "changeflow_listener_tasks_published_total", task="b") == 1
    assert get(metrics, "changeflow_listener_dead_letters_total", task="a") == 1
    assert get(metrics, "changeflow_listener_batch_events_count") == 1  # the empty getMore is no batch
    assert get(metrics, "changeflow_listener_batch_events_sum") == 3
    assert get(metrics, "changeflow_listener_polls_total") == 2
    assert get(metrics, "changeflow_listener_publish_seconds_count") == 1


def test_lag_follows_the_stream_and_only_the_active_listener_reports_it() -> None:
    clock = Clock()
    metrics = ListenerMetrics("s", CollectorRegistry(), clock=clock)
    active = [False]
    metrics.holds_lease(lambda: active[0])
    assert get(metrics, "changeflow_listener_active") == 0
    assert get(metrics, "changeflow_listener_lag_seconds") is None  # a standby has no position
    active[0] = True
    metrics.opened(T0)  # resumed at a checkpoint of T0: behind until an empty getMore
    clock.now = T0 + timedelta(seconds=10)
    assert get(metrics, "changeflow_listener_active") == 1
    assert get(metrics, "changeflow_listener_lag_seconds") == 10
    metrics.read([event("users", "insert", T0 + timedelta(seconds=8))], idle=False)
    assert get(metrics, "changeflow_listener_lag_seconds") == 2
    clock.now += timedelta(seconds=5)  # stuck after that batch (broker down): the lag grows
    assert get(metrics, "changeflow_listener_lag_seconds") == 7
    metrics.read([], idle=True)
    assert get(metrics, "changeflow_listener_lag_seconds") == 0
    metrics.read([], idle=False)  # an empty read in the middle of a split event: still caught up before
    assert get(metrics, "changeflow_listener_lag_seconds") == 0
    metrics.read([event("users", "insert", clock.now - timedelta(seconds=1))], idle=False)
    assert get(metrics, "changeflow_listener_lag_seconds") == 1


def test_checkpoint_age_and_oplog_headroom_from_the_real_oplog(db: Database) -> None:
    db.c.insert_one({"x": 1})
    oldest = oldest_oplog_time(db.client)
    assert oldest is not None and oldest.tzinfo is not None
    clock = Clock()
    clock.now = oldest + timedelta(seconds=100)
    metrics = ListenerMetrics("s", CollectorRegistry(), db=db, clock=clock)
    metrics.holds_lease(lambda: True)
    assert get(metrics, "changeflow_listener_checkpoint_age_seconds") is None  # no checkpoint yet
    metrics.checkpoint(oldest + timedelta(seconds=40))
    assert get(metrics, "changeflow_listener_checkpoint_age_seconds") == 60
    assert get(metrics, "changeflow_listener_oplog_headroom_seconds") == 40
    assert get(metrics, "changeflow_listener_gaps_open") == 0
    db.changeflow_gaps.insert_one({"_id": "s-1", "stream": "s", "resolved": False})
    db.changeflow_gaps.insert_one({"_id": "t-1", "stream": "t", "resolved": False})
    metrics._queried_at = 0.0  # the next scrape queries again instead of waiting a second
    assert get(metrics, "changeflow_listener_gaps_open") == 1


def test_an_unreachable_mongodb_leaves_the_queried_gauges_out() -> None:
    client: pymongo.MongoClient = pymongo.MongoClient("mongodb://127.0.0.1:1/", serverSelectionTimeoutMS=100)
    metrics = ListenerMetrics("s", CollectorRegistry(), db=client.changeflow, clock=Clock())
    metrics.holds_lease(lambda: True)
    metrics.checkpoint(T0)
    found = samples(metrics)
    assert ("changeflow_listener_checkpoint_age_seconds", frozenset()) in found
    assert ("changeflow_listener_oplog_headroom_seconds", frozenset()) not in found
    assert ("changeflow_listener_gaps_open", frozenset()) not in found
    client.close()
