"""The backfill loop: read a batch in `_id` order, publish its events, then save the position.

    read   find(page_query(filter, last_id)).sort(_id).limit(batch)
    send   the batch's messages through the listener's publisher, in slices when --rate is set
           (token bucket), after waiting while the broker's queue is at LISTENER_MAX_QUEUE_LENGTH
    save   last_id := the batch's last _id, counts (only now: a crash before it re-sends the batch,
           whose task ids the dedup guard has seen)

A stop request (SIGINT/SIGTERM: `stop` is set) is honoured between slices and during every wait:
the batch being sent is abandoned, its position not saved, and what of it went out already is sent
again on resume (same task ids, deduplicated). A broker that cannot be reached is retried with
backoff (an outage delays a backfill, it does not fail it); MongoDB errors end the run (the caller
records it as interrupted, resumable).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from changeflow.backfill.events import backfill_event, backfill_message
from changeflow.backfill.position import page_query
from changeflow.backfill.progress import Progress, ProgressPrinter
from changeflow.backfill.rate import TokenBucket, slice_size, slices
from changeflow.listener.backpressure import next_wait
from changeflow.listener.publish import BrokerUnavailable, Message, Publisher, record_unpublishable

if TYPE_CHECKING:
    from pymongo.database import Database

    from changeflow.backfill.store import BackfillStore
    from changeflow.listener.backpressure import Backpressure

log = logging.getLogger("changeflow.backfill")

BROKER_RETRY_MAX_SECONDS = 10.0


@dataclass
class Job:
    """What one run of a backfill does (from its record) and where it starts."""

    backfill_id: str
    collection: str
    task: str
    query: Mapping[str, Any]
    batch: int
    rate: float | None
    started: bool = False  # a position was saved: last_id is meaningful
    last_id: Any = None
    counts: dict[str, int] = field(default_factory=lambda: {"published": 0, "dead_lettered": 0})


@dataclass
class Outcome:
    finished: bool  # every document was published (False: stopped on request)
    last_id: Any
    started: bool


def run(
    db: Database,
    publisher: Publisher,
    store: BackfillStore,
    job: Job,
    *,
    stop: threading.Event,
    progress: Progress,
    printer: ProgressPrinter,
    backpressure: Backpressure | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Publish the job's remaining documents; returns when done or stopped. Raises PyMongoError, TakenOver."""
    collection = db[job.collection]
    bucket = TokenBucket(job.rate, clock()) if job.rate is not None else None
    size = slice_size(job.batch, job.rate)
    progress.start(clock())
    while not stop.is_set():
        query = page_query(job.query, job.last_id, started=job.started)
        read_at = datetime.now(UTC)
        documents = list(collection.find(query).sort("_id", 1).limit(job.batch))
        if not documents:
            printer.show(progress, clock(), final=True)
            return Outcome(True, job.last_id, job.started)
        messages = [
            backfill_message(backfill_event(db.name, job.collection, doc, job.backfill_id, read_at), job.task)
            for doc in documents
        ]
        sent = {"published": 0, "dead_lettered": 0}  # counted into the job once the batch is saved
        for piece in slices(messages, size):
            if not _wait_for_room(backpressure, stop):
                break
            if not _wait_for_tokens(bucket, len(piece), stop, clock):
                break
            if not _publish(db, publisher, piece, sent, stop):
                break
        else:
            for name, count in sent.items():
                job.counts[name] = job.counts.get(name, 0) + count
            job.last_id, job.started = documents[-1]["_id"], True
            store.save_position(job.backfill_id, job.last_id, job.counts)
            progress.advance(len(documents), clock())
            printer.show(progress, clock())
            continue
        break  # stopped inside the batch: abandoned, its position not saved
    printer.show(progress, clock(), final=True)
    return Outcome(False, job.last_id, job.started)


def _wait_for_room(backpressure: Backpressure | None, stop: threading.Event) -> bool:
    """Wait while the broker's queue is at its bound; False when stopped meanwhile."""
    if backpressure is None:
        return True
    wait: float | None = None
    logged = False
    while True:
        try:
            queued = backpressure.full()
        except BrokerUnavailable as exc:
            queued, error = -1, exc
        else:
            error = None
        if queued is None:
            return True
        if not logged:
            if error is not None:
                log.warning("cannot read the broker's queue length (%s): waiting", error)
            else:
                log.info("broker queue at %s (bound %s): waiting for the workers", queued, backpressure.limit)
            logged = True
        wait = next_wait(wait)
        if stop.wait(wait):
            return False


def _wait_for_tokens(
    bucket: TokenBucket | None, count: int, stop: threading.Event, clock: Callable[[], float]
) -> bool:
    if bucket is None:
        return True
    delay = bucket.reserve(count, clock())
    return not (delay > 0 and stop.wait(delay))


def _publish(
    db: Database, publisher: Publisher, messages: Sequence[Message], counts: dict[str, int],
    stop: threading.Event,
) -> bool:  # fmt: skip
    """Publish `messages` (retrying a broker outage with backoff); False when stopped before it went out."""
    wait = 0.5
    while True:
        try:
            rejected = publisher.publish(messages)
        except BrokerUnavailable as exc:
            log.warning("broker unavailable (%s): retrying in %.1fs (Ctrl-C stops, resumable)", exc, wait)
            if stop.wait(wait):
                return False
            wait = min(BROKER_RETRY_MAX_SECONDS, wait * 2)
            continue
        for each in rejected:
            record_unpublishable(db, each)
        counts["published"] += len(messages) - len(rejected)
        counts["dead_lettered"] += len(rejected)
        return True
