"""Per-key ordering end to end: 300 orders through pending -> paid -> shipped -> delivered, written fast.

Two real worker processes with two pool processes each run tests/e2e/ordering_app.py: the same
notification twice, once `ordered_by=True` and once unordered, each with 0-20 ms random latency and
10% transient failures (retried with backoff up to RETRY_BACKOFF_MAX=1 s). At the SMTP sink every
order's ordered emails arrive in commit order (0 inversions), none lost, none doubled. The unordered
twin in the same run shows the difference: with 1200 tasks, each 10% likely to be retried up to a
second later while the order's next statuses run at once, it inverts some order every run
(P(no inversion) is vanishingly small), so the test asserts it found some.
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
from bson import ObjectId

from harness.pipeline import LocalPipeline, wait_until
from harness.processes import listener_process, worker_process
from harness.smtp_sink import ReceivedMessage

pytestmark = pytest.mark.e2e

APP = "tests.e2e.ordering_app"
STATUSES = ("pending", "paid", "shipped", "delivered")
ORDERS = 300


def inversions(messages: list[ReceivedMessage], label: str) -> tuple[int, dict[str, list[str]]]:
    """Pairs of one order's emails that arrived against commit order, and each order's arrivals."""
    arrived: dict[str, list[str]] = defaultdict(list)
    for message in messages:
        kind, order_id, status = str(message["Subject"]).split()
        if kind == label:
            arrived[order_id].append(status)
    count = 0
    for statuses in arrived.values():
        ranks = [STATUSES.index(s) for s in statuses]
        count += sum(1 for i in range(len(ranks)) for j in range(i + 1, len(ranks)) if ranks[i] > ranks[j])
    return count, arrived


def test_ordered_tasks_arrive_in_commit_order_per_order() -> None:
    env = {"RETRY_BACKOFF_MAX": "1", "ORDERING_MAX_LATENCY_MS": "20", "ORDERING_FAILURE_RATE": "0.1"}
    pipeline = LocalPipeline(workers=0, extra_env=env).start(listener=False)
    processes = []
    try:
        for name in ("ordw1", "ordw2"):
            worker = worker_process(pipeline.env, name, app=APP, concurrency=2, log_dir=pipeline.log_dir)
            processes.append(worker.start(timeout=90))
        processes.append(
            listener_process(pipeline.env, "-A", APP, log_dir=pipeline.log_dir).start(timeout=60)
        )
        orders = pipeline.db.orders
        ids = [ObjectId() for _ in range(ORDERS)]
        for order_id in ids:  # each order's four writes back to back: its tasks are published together
            orders.insert_one({"_id": order_id, "status": "pending"})
            for status in STATUSES[1:]:
                orders.update_one({"_id": order_id}, {"$set": {"status": status}})

        sink = pipeline.sink
        assert sink is not None
        expected = 2 * len(ids) * len(STATUSES)
        arrived_all = wait_until(lambda: len(sink.messages) >= expected, timeout=240)
        assert arrived_all, f"{len(sink.messages)} of {expected} emails\n{pipeline.logs()}"
        # Quiet for a moment: a doubled email would show up now.
        time.sleep(2)
        messages = sink.messages
        doubled = {mid: n for mid, n in sink.count_by_message_id().items() if n > 1}
        assert not doubled, doubled
        assert len(messages) == expected

        ordered, arrived = inversions(messages, "ordered")
        unordered, _ = inversions(messages, "unordered")
        expected_ids = {str(i) for i in ids}
        assert set(arrived) == expected_ids
        assert all(sorted(s) == sorted(STATUSES) for s in arrived.values())  # none lost, none doubled
        assert ordered == 0, {o: s for o, s in arrived.items() if s != list(STATUSES)}
        assert unordered > 0, "the unordered twin inverted nothing: the workload no longer tests ordering"
        worker_logs = "".join(p.log_text(since_start=False) for p in processes[:2])
        # The ordering did its work by parking, and chaining (an order's next tasks run inline in the
        # process whose task ended), and the transient failures were retried.
        assert "parked ordering_app.notify_ordered" in worker_logs
        assert "chained ordering_app.notify_ordered" in worker_logs
        assert "retry" in worker_logs.lower()
        # Every key's set and parked hash emptied: nothing stuck.
        client = pipeline.redis_client()
        leftover = list(client.scan_iter("changeflow:order:*")) + list(
            client.scan_iter("changeflow:parked:*")
        )
        client.close()
        assert leftover == []
        print(f"inversions: ordered {ordered}, unordered {unordered} (of {expected // 2} emails each)")
    finally:
        for process in processes:
            process.stop()
        pipeline.stop()


def test_a_dead_letter_lets_its_key_move_on_and_names_the_tasks_that_ran_past_it() -> None:
    """Every order's "paid" notification fails permanently: its dead letter lists "shipped" and
    "delivered" (published before any worker ran, so still pending then), which then run, in order."""
    env = {"ORDERING_MAX_LATENCY_MS": "5", "ORDERING_FAILURE_RATE": "0", "ORDERING_DEAD_STATUS": "paid"}
    pipeline = LocalPipeline(workers=0, extra_env=env).start(listener=False)
    processes = []
    try:
        processes.append(
            listener_process(pipeline.env, "-A", APP, log_dir=pipeline.log_dir).start(timeout=60)
        )
        ids = [ObjectId() for _ in range(5)]
        for order_id in ids:
            pipeline.db.orders.insert_one({"_id": order_id, "status": "pending"})
            for status in STATUSES[1:]:
                pipeline.db.orders.update_one({"_id": order_id}, {"$set": {"status": status}})
        client = pipeline.redis_client()
        tasks = 2 * len(ids) * len(STATUSES)
        assert wait_until(lambda: client.llen("celery") == tasks, timeout=60), client.llen("celery")
        client.close()
        for name in ("ordw1", "ordw2"):
            worker = worker_process(pipeline.env, name, app=APP, concurrency=2, log_dir=pipeline.log_dir)
            processes.append(worker.start(timeout=90))
        sink = pipeline.sink
        assert sink is not None
        expected = tasks - len(ids)  # every email but the ordered "paid" ones
        assert wait_until(lambda: len(sink.messages) >= expected, timeout=120), pipeline.logs()
        letters = pipeline.db.changeflow_dead_letters
        assert wait_until(lambda: letters.count_documents({}) == len(ids), timeout=30)
        time.sleep(1)
        assert len(sink.messages) == expected
        ordered, arrived = inversions(sink.messages, "ordered")
        assert ordered == 0
        assert all(statuses == ["pending", "shipped", "delivered"] for statuses in arrived.values()), arrived
        for letter in letters.find():
            assert letter["task"] == "ordering_app.notify_ordered" and letter["reason"] == "permanent"
            ordering = letter["ordering"]
            assert ordering["ran_past_count"] == 2 and len(ordering["ran_past"]) == 2
            ran_past_ids = {
                str(m["Message-ID"]).strip("<>").split("@")[0]
                for m in sink.messages
                if str(m["Subject"]).startswith(f"ordered {letter['payload']['documentKey']['_id']} ")
                and not str(m["Subject"]).endswith(" pending")
            }
            assert set(ordering["ran_past"]) == ran_past_ids  # shipped and delivered: their task ids
    finally:
        for process in processes:
            process.stop()
        pipeline.stop()
