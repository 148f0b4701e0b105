"""Batched tasks end to end: `python -m listener` groups `tasks.update_analytics`'s events into batches
(`@app.on(..., batch=ANALYTICS_BATCH)`), two `celery -A worker worker` processes run them behind the
per-event guard (changeflow/worker/batches.py). Writes go through plain pymongo."""

from __future__ import annotations

import re
from typing import Any

import pytest
from bson import ObjectId
from pymongo.database import Database

from changeflow.listener.payload import task_payload
from changeflow.worker.batches import batch_id
from changeflow.worker.keys import dedup_key
from changeflow.worker.testing import configured
from harness.pipeline import LocalPipeline, wait_until

pytestmark = pytest.mark.e2e

TASK = "tasks.update_analytics"
N = 120  # more than one batch of ANALYTICS_BATCH
RECEIVED = re.compile(r"Task tasks\.update_analytics\[[0-9a-f-]+\] received")


def worker_logs(pipeline: LocalPipeline) -> str:
    return "\n".join(w.log_text(since_start=False) for w in pipeline.workers)


def counts(db: Database) -> dict[str, int]:
    return {c["status"]: c["count"] for c in db.order_analytics.find()}


def read_events(stream: Any, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    assert wait_until(lambda: bool(events.extend(iter(stream.try_next, None))) or len(events) >= count, 30)
    return events


def test_order_writes_are_counted_once_in_batches_and_a_redelivered_batch_does_not_double_them() -> None:
    orders = [{"_id": ObjectId(), "user_id": ObjectId(), "status": "pending", "total": 5} for _ in range(N)]
    with LocalPipeline(workers=2) as pipeline:
        db = pipeline.db
        with db.orders.watch() as stream:  # the same events the listener reads, to send one batch again
            db.orders.insert_many(orders)  # one write: the listener reads them together
            db.orders.update_many({}, {"$set": {"status": "paid"}})
            events = read_events(stream, 2 * N)

        def counted() -> bool:
            return counts(db) == {"pending": N, "paid": N}

        assert wait_until(counted, timeout=90), (counts(db), pipeline.logs())
        assert db.order_analytics_applied.count_documents({}) == 2 * N
        received = len(RECEIVED.findall(worker_logs(pipeline)))
        # Grouped: far fewer task messages than events (at most a few batches of one at the edges).
        assert 0 < received < N, received

        # A batch delivered again (what Redis does when a worker dies before its ack): no event of it
        # reaches the handler again, no counter moves.
        payloads = [task_payload(e) for e in events[:50]]
        keys = [dedup_key(p["_id"], TASK) for p in payloads]
        with configured(**pipeline.env):
            from worker import app

            app.send_task(TASK, args=[payloads], task_id=batch_id(keys))

        def absorbed() -> bool:
            logs = worker_logs(pipeline)
            return all(f"duplicate {TASK} {key}" in logs for key in keys)

        assert wait_until(absorbed, timeout=30), pipeline.logs()
        assert counts(db) == {"pending": N, "paid": N}
        assert db.order_analytics_applied.count_documents({}) == 2 * N
        assert list(db.changeflow_dead_letters.find()) == []
        logs = pipeline.logs()
    assert "Traceback" not in logs, logs


def test_one_bad_event_in_a_batch_is_dead_lettered_alone_and_the_others_are_counted() -> None:
    good = [{"_id": ObjectId(), "status": "pending", "total": 5} for _ in range(30)]
    bad = {"_id": ObjectId(), "status": {"code": 3}, "total": 5}  # a status that is not a string
    plain = [{"_id": ObjectId(), "total": 5} for _ in range(5)]  # no status: counts for nothing (a skip)
    with LocalPipeline(workers=2) as pipeline:
        db = pipeline.db
        db.orders.insert_many([*good[:15], bad, *plain, *good[15:]])

        def settled() -> bool:
            return counts(db) == {"pending": 30} and db.changeflow_dead_letters.count_documents({}) == 1

        assert wait_until(settled, timeout=90), (counts(db), pipeline.logs())
        letters = list(db.changeflow_dead_letters.find())
        # The dead letter is stored before the batch's task fails: its failure is logged just after.
        failed = f"BatchEventsFailed: 1 of the batch's events were dead-lettered: {letters[0]['_id']}"
        wait_until(lambda: failed in worker_logs(pipeline), timeout=30)
        received = len(RECEIVED.findall(worker_logs(pipeline)))
        logs = worker_logs(pipeline)

    assert received < len(good) + 1 + len(plain), received  # the bad event travelled in a batch
    (letter,) = letters
    assert letter["task"] == TASK and letter["reason"] == "permanent"
    assert letter["error"] == "ValueError: order status must be a string, got dict {'code': 3}"
    assert letter["payload"]["documentKey"]["_id"] == bad["_id"]
    # Its own key, the one its single message would have had: a replay runs it alone.
    assert letter["_id"] == dedup_key(letter["payload"]["_id"], TASK) == letter["task_id"]
    # The batch's task ends as FAILURE (what Flower shows), naming the one event.
    assert failed in logs, logs
