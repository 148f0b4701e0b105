"""What the benchmarks share: the machine line, real-shaped change events, private servers, the core loop.

Every benchmark runs against servers of its own (a private redis-server on a free port, the MongoDB
test server as a subprocess): never the Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import celery
import kombu
import psutil
import pymongo
import redis
from bson import Decimal128, Int64, ObjectId, Timestamp
from pymongo.database import Database

from changeflow.listener.checkpoints import CheckpointStore
from changeflow.listener.gaps import GapStore
from changeflow.listener.publish import Publisher
from changeflow.listener.stream import Listener
from changeflow.worker.settings import Settings
from harness.processes import ManagedProcess
from worker import app as repo_app

ROUTES = repo_app.routes  # this repository's app (tasks/): the card's routes

STREAM = "bench"
BATCH_SIZE = 500  # LISTENER_BATCH_SIZE's default: one publish round trip per 500 events


def machine() -> str:
    """One line naming the machine and the versions the figures depend on."""
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
        redis_version = next((p.split("=", 1)[1] for p in out.split() if p.startswith("v=")), out.strip())
    except (OSError, subprocess.CalledProcessError):
        redis_version = "?"
    cpu = platform.processor() or platform.machine()
    return (
        f"machine: {os.cpu_count()} cores ({cpu}, {platform.system()} {platform.release()}), "
        f"Python {platform.python_version()}, redis-server {redis_version}, redis-py {redis.__version__}, "
        f"celery {celery.__version__}, kombu {kombu.__version__}, pymongo {pymongo.version}; "
        f"load average now {os.getloadavg()[0]:.2f} (other processes share these cores)"
    )


# -- real-shaped change events -------------------------------------------------------------------
def change_events(count: int, *, start: int = 0) -> Iterator[dict[str, Any]]:
    """`count` change events as a MongoDB change stream delivers them (fullDocument looked up).

    The mix of the sample workload: a third user inserts (2 tasks each), a third order inserts
    (1 task), a third order status updates (2 tasks): 5/3 task messages per event on average.
    Resume tokens are unique and increasing, like real ones.
    """
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).replace(tzinfo=None)
    for i in range(start, start + count):
        kind = i % 3
        oid = ObjectId()
        event: dict[str, Any] = {
            "_id": {"_data": f"8267{i:012X}000000012B042C0100296E5A1004"},
            "clusterTime": Timestamp(1_767_225_600 + i // 1000, i % 1000 + 1),
            "wallTime": base + dt.timedelta(milliseconds=i),
            "lsid": {"id": ObjectId(), "uid": b"\x00" * 32},  # not part of the payload: trimmed away
            "txnNumber": Int64(i),
        }
        if kind == 0:
            doc = {"_id": oid, "email": f"user{i}@example.test", "name": f"User {i}", "plan": "free"}
            event.update(operationType="insert", ns={"db": "changeflow", "coll": "users"}, fullDocument=doc)
        else:
            doc = {
                "_id": oid, "user_id": ObjectId(), "status": "pending" if kind == 1 else "shipped",
                "total": Decimal128(f"{i % 500}.99"), "items": [{"sku": f"SKU-{i % 97}", "qty": 1 + i % 3}],
                "created_at": base + dt.timedelta(seconds=i),
            }  # fmt: skip
            event.update(ns={"db": "changeflow", "coll": "orders"}, fullDocument=doc)
            if kind == 1:
                event["operationType"] = "insert"
            else:
                event["operationType"] = "update"
                event["updateDescription"] = {
                    "updatedFields": {"status": "shipped"}, "removedFields": [], "truncatedArrays": [],
                }  # fmt: skip
        event["documentKey"] = {"_id": oid}
        yield event


# -- driving the real Listener from an iterator ------------------------------------------------
class CountingCheckpointStore(CheckpointStore):
    """A real CheckpointStore that counts its writes."""

    saves = 0

    def save(self, *args: Any, **kwargs: Any) -> None:
        super().save(*args, **kwargs)
        self.saves += 1


class _IteratorStream:
    """Stands in for pymongo's ChangeStream: hands out the events, then stops the listener."""

    def __init__(self, events: Iterator[Mapping[str, Any]], on_end: Callable[[], None]) -> None:
        self.events = events
        self.on_end = on_end
        self.resume_token: Mapping[str, Any] | None = {"_data": "8266000000000000000000"}
        self.alive = True

    def try_next(self) -> Mapping[str, Any] | None:
        event = next(self.events, None)
        if event is None:
            self.on_end()  # the listener finishes this batch (publish + checkpoint) and returns
            return None
        self.resume_token = event["_id"]
        return event

    def __enter__(self) -> _IteratorStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _IteratorDatabase:
    """Stands in for the watched Database: watch() returns the iterator stream; command() answers the
    listener's hello (a MongoDB 7.0, which splits events over 16 MB) and its collMod for pre-images.
    Nothing else is used."""

    def __init__(self, name: str, events: Iterable[Mapping[str, Any]]) -> None:
        self.name = name
        self.events = iter(events)
        self.listener: Listener | None = None

    def watch(self, *args: Any, **kwargs: Any) -> _IteratorStream:
        assert self.listener is not None
        return _IteratorStream(self.events, self.listener.stop)

    def command(self, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # collMod: the listener enables pre-images for routes that ask for them (nothing to do here).
        assert name in ("hello", "collMod"), name
        return {"maxWireVersion": 21} if name == "hello" else {"ok": 1.0}


def run_listener_core(
    events: Iterable[Mapping[str, Any]], publisher: Publisher, checkpoint_db: Database
) -> Listener:
    """changeflow's `Listener` (changeflow/listener/stream.py) over `events`: routing, payload, dedup keys, a
    publish per batch of BATCH_SIZE events, and checkpoints as the listener saves them by default (into
    `checkpoint_db`, a real CheckpointStore). Returns the listener once it has delivered every event,
    for its stats; `changeflow.listener.checkpoints.saves` counts the checkpoint writes."""
    db = _IteratorDatabase(checkpoint_db.name, events)
    checkpoints = CountingCheckpointStore(checkpoint_db)
    # A first start every time: runs over the same events would otherwise find their last position
    # saved already, and skip the final save.
    checkpoints.collection.delete_many({"_id": STREAM})
    settings = Settings(
        listener_batch_size=BATCH_SIZE,
        listener_max_await_ms=600_000,
        # Settings require the lease and the health check to outlast a getMore's wait (no lease here).
        listener_lease_ttl_seconds=3600,
        listener_max_stall_seconds=3600,
        listener_stream_name=STREAM,
    )  # LISTENER_CHECKPOINT_INTERVAL_MS stays the default (1 s): a save per second, and one on stop
    listener = Listener(
        db,  # type: ignore[arg-type]
        publisher,
        checkpoints,
        ROUTES,
        settings=settings,
        summary_seconds=3600,
        gaps=GapStore(checkpoint_db),  # beside the checkpoints: the watched database is a stand-in
    )
    db.listener = listener
    code = listener.run()
    if code != 0:
        raise RuntimeError(f"listener exited with {code}")
    return listener


# -- numbers -------------------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100), nearest rank; values need not be sorted."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Timer:
    """Wall time, and this process's CPU time (less sensitive to other load on the machine)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def wait_drained(client: redis.Redis, worker: ManagedProcess, deadline: float) -> None:
    """Until the queue is empty and nothing is unacked: every message ran (and was acked)."""
    while client.llen("celery") or client.hlen("unacked"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker did not finish:\n{worker.log_text()[-3000:]}")
        time.sleep(0.01)


def tree_cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of `process` and its living children (a prefork worker's pool)."""
    total = 0.0
    for one in [process, *process.children(recursive=True)]:
        try:
            times = one.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total
