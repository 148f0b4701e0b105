"""The listener's Prometheus metrics, served on LISTENER_METRICS_PORT (`/metrics`) when it is set.

The watch loop (stream.py) reports what it does through `ListenerMetrics`; the values that are
about time are computed when Prometheus scrapes, so they keep moving while the loop is stuck:

- `changeflow_listener_lag_seconds`: now minus the wall time of the newest event read, and 0 once
  the stream is caught up. Caught up means: the last getMore returned an empty batch (with its
  postBatchResumeToken), i.e. the server had nothing after the events already processed. A stalled
  loop (broker down, a blocked call) makes no such getMore, so its lag keeps growing. At the end of a
  burst the lag stays up to LISTENER_MAX_AWAIT_MS too high (the empty getMore waits that long).
  After a (re)start, until the first empty getMore, the lag counts from the checkpoint's time.
- `changeflow_listener_checkpoint_age_seconds`: now minus the time of the position the checkpoint
  holds (its last event's wall time, or when an idle stream's getMore returned).
- `changeflow_listener_oplog_headroom_seconds`: the checkpoint's time minus the oldest oplog
  entry's (`local.oplog.rs`, sorted `$natural: 1`, limit 1): how much more oplog may roll over
  before the checkpoint falls off it (ChangeStreamHistoryLost). Needs read access to `local`.
- `changeflow_listener_gaps_open`: gaps of this stream recorded in `changeflow_gaps` and not
  resolved (`python -m listener reconcile`).
- `changeflow_listener_active`: 1 while this process holds the stream's lease (it is the one
  publishing), else 0.

Lag and checkpoint age are reported by the active listener only (a standby has no position).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pymongo.database import Database
from pymongo.errors import PyMongoError

from changeflow.listener.gaps import COLLECTION as GAPS
from changeflow.listener.publish import Message, Rejected

log = logging.getLogger(__name__)

PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# The oplog and gap queries run at most this often, however often Prometheus scrapes.
QUERY_EVERY_SECONDS = 1.0

# Every metric this module defines (tests check that dashboards and alerts name only these).
METRIC_NAMES = (
    "changeflow_listener_events_total",
    "changeflow_listener_tasks_published_total",
    "changeflow_listener_publish_seconds",
    "changeflow_listener_batch_events",
    "changeflow_listener_dead_letters_total",
    "changeflow_listener_polls_total",
    "changeflow_listener_lag_seconds",
    "changeflow_listener_checkpoint_age_seconds",
    "changeflow_listener_oplog_headroom_seconds",
    "changeflow_listener_gaps_open",
    "changeflow_listener_active",
)


def event_time(event: Mapping[str, Any]) -> datetime | None:
    """When the event happened: its wallTime, else its clusterTime (aware, UTC)."""
    wall = event.get("wallTime")
    if isinstance(wall, datetime):
        return wall if wall.tzinfo else wall.replace(tzinfo=UTC)
    cluster = event.get("clusterTime")
    as_datetime = getattr(cluster, "as_datetime", None)
    return as_datetime() if as_datetime is not None else None


def seconds_between(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds()


def lag_seconds(now: datetime, newest: datetime | None, caught_up: bool) -> float:
    """The listener's lag: 0 when caught up (or nothing known), else how old the newest event read is."""
    if caught_up or newest is None:
        return 0.0
    return max(0.0, seconds_between(now, newest))


def oldest_oplog_time(client: Any) -> datetime | None:
    """The time of the oldest entry of `local.oplog.rs` (its `wall`, else its `ts`); None if empty."""
    doc = client.local["oplog.rs"].find({}, {"ts": 1, "wall": 1}).sort("$natural", 1).limit(1)
    for entry in doc:
        wall = entry.get("wall")
        if isinstance(wall, datetime):
            return wall if wall.tzinfo else wall.replace(tzinfo=UTC)
        ts = entry.get("ts")
        return ts.as_datetime() if ts is not None else None
    return None


class ListenerMetrics:
    """Counters the loop increments and the state the scrape-time gauges are computed from.

    `db` (optional) is where the oplog and the gaps are read at scrape time: a client of its own with
    a short server selection timeout, so a scrape never waits long on an unreachable MongoDB.
    """

    def __init__(
        self,
        stream: str,
        registry: CollectorRegistry | None = None,
        *,
        db: Database | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.stream = stream
        self.registry = registry or CollectorRegistry()
        self.clock = clock
        self.db = db
        r = self.registry
        self.events = Counter(
            "changeflow_listener_events_total",
            "Change events read from the stream",
            ["collection", "operation"],
            registry=r,
        )
        self.tasks = Counter(
            "changeflow_listener_tasks_published_total",
            "Task messages the broker accepted",
            ["task"],
            registry=r,
        )
        self.publish_seconds = Histogram(
            "changeflow_listener_publish_seconds",
            "Time to publish one batch of task messages",
            buckets=PUBLISH_BUCKETS,
            registry=r,
        )
        self.batch_events = Histogram(
            "changeflow_listener_batch_events",
            "Events per batch read from the stream",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.dead_letters = Counter(
            "changeflow_listener_dead_letters_total",
            "Task messages the serializer refused, stored as dead letters",
            ["task"],
            registry=r,
        )
        self.polls = Counter(
            "changeflow_listener_polls_total", "getMores on the change stream that returned", registry=r
        )
        self._lock = threading.Lock()
        self._active: Callable[[], bool] = lambda: False
        self._newest: datetime | None = None
        self._caught_up = False
        self._checkpoint: datetime | None = None
        self._queried_at = 0.0
        self._oldest: datetime | None = None
        self._gaps: int | None = None
        r.register(_Computed(self))

    # -- what the loop reports -----------------------------------------------------------------
    def holds_lease(self, active: Callable[[], bool]) -> None:
        """How to tell whether this process is the active listener (asked at each scrape)."""
        self._active = active

    def opened(self, position_time: datetime | None) -> None:
        """The stream (re)opened at a position of this time: behind until an empty getMore says not."""
        with self._lock:
            self._newest, self._caught_up = position_time, False

    def read(self, events: Sequence[Mapping[str, Any]], *, idle: bool) -> None:
        """A getMore returned `events`; `idle`: it came back empty (nothing after what was read)."""
        self.polls.inc()
        if idle:
            with self._lock:
                self._caught_up = True
        if not events:
            return
        self.batch_events.observe(len(events))
        tally = Tally((_collection(e), str(e.get("operationType", "unknown"))) for e in events)
        for (collection, operation), count in tally.items():
            self.events.labels(collection, operation).inc(count)
        newest = event_time(events[-1])
        with self._lock:
            self._caught_up = False
            if newest is not None:
                self._newest = newest

    def published(self, messages: Iterable[Message], rejected: Iterable[Rejected], seconds: float) -> None:
        """The broker accepted `messages` but the `rejected` ones, in `seconds`."""
        self.publish_seconds.observe(seconds)
        tally = Tally(m.task_name for m in messages)
        tally.subtract(r.message.task_name for r in rejected)
        for task, count in tally.items():
            if count > 0:
                self.tasks.labels(task).inc(count)

    def dead_lettered(self, task: str) -> None:
        self.dead_letters.labels(task).inc()

    def checkpoint(self, position_time: datetime | None) -> None:
        """The checkpoint (saved or loaded) is at a position of this time."""
        with self._lock:
            self._checkpoint = position_time

    # -- scrape time ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, float]:
        """The computed gauges' values now (a gauge without a value is left out)."""
        now = self.clock()
        with self._lock:
            newest, caught_up, checkpoint = self._newest, self._caught_up, self._checkpoint
        active = self._active()
        values = {"changeflow_listener_active": 1.0 if active else 0.0}
        self._query()
        if self._gaps is not None:
            values["changeflow_listener_gaps_open"] = float(self._gaps)
        if not active:
            return values
        values["changeflow_listener_lag_seconds"] = lag_seconds(now, newest, caught_up)
        if checkpoint is not None:
            age = max(0.0, seconds_between(now, checkpoint))
            values["changeflow_listener_checkpoint_age_seconds"] = age
            if self._oldest is not None:
                headroom = seconds_between(checkpoint, self._oldest)
                values["changeflow_listener_oplog_headroom_seconds"] = headroom
        return values

    def _query(self) -> None:
        if self.db is None or time.monotonic() - self._queried_at < QUERY_EVERY_SECONDS:
            return
        self._queried_at = time.monotonic()
        try:
            self._oldest = oldest_oplog_time(self.db.client)
            self._gaps = self.db[GAPS].count_documents({"stream": self.stream, "resolved": False})
        except PyMongoError as exc:
            # Left out of this scrape; the loop's own errors are logged where they happen.
            log.warning("metrics: could not read the oplog window or the gaps: %s", exc)
            self._oldest = self._gaps = None


class _Computed(Collector):
    HELP = {
        "changeflow_listener_active": "1 while this process holds the stream's lease",
        "changeflow_listener_lag_seconds": "Now minus the newest event's wall time; 0 when caught up",
        "changeflow_listener_checkpoint_age_seconds": "Now minus the time of the checkpoint's position",
        "changeflow_listener_oplog_headroom_seconds": "Checkpoint time minus the oldest oplog entry's time",
        "changeflow_listener_gaps_open": "Recorded gaps of lost history of this stream not resolved yet",
    }

    def __init__(self, metrics: ListenerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, text in self.HELP.items():
            yield GaugeMetricFamily(name, text)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, value in self.metrics.snapshot().items():
            yield GaugeMetricFamily(name, self.HELP[name], value=value)


def _collection(event: Mapping[str, Any]) -> str:
    ns = event.get("ns")
    return str(ns.get("coll", "")) if isinstance(ns, Mapping) else ""


def serve(metrics: ListenerMetrics, host: str, port: int) -> None:
    """Serve `/metrics` from a daemon thread (OSError when the port is taken)."""
    start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", host, port)
