"""A worker SIGKILLed in the middle of a chain (docs/ordering.md, "Chains"): nothing lost, order kept.

One order's three status notifications (`tasks.send_shipping_notification`, ordered per order) are
queued before a worker (the fault suite's app: every task pauses 4 s after its effect, before its
done record) starts: the first runs, the other two are parked, and the first's end runs the second
inline. The worker is SIGKILLed while that chained task is in its pause. A new worker gets the first
task's message again (never acked), finds it done, hands the key over again from the parked copies
and runs the rest: every email arrives, in order; only the chained task caught by the kill may be
mailed twice (the README's crash window), and no key is left waiting.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import redis
from bson import ObjectId

from harness.pipeline import LocalPipeline, wait_until
from harness.processes import ManagedProcess, worker_process
from tests.faults.knobs import DELAY_ENV, FAULT_WORKER, FLAG_ENV, WINDOW_LOG
from tests.integration.test_listener import decode

pytestmark = pytest.mark.e2e


def queued_events(client: redis.Redis) -> int:
    """The change events the queued task messages carry (a batched task's message: several)."""
    payloads = [decode(raw)["payload"] for raw in client.lrange("celery", 0, -1)]
    return sum(len(payload) if isinstance(payload, list) else 1 for payload in payloads)


TASK = "tasks.send_shipping_notification"
STATUSES = ("shipped", "delivered", "shipped")


def test_a_worker_killed_mid_chain_loses_nothing_and_keeps_the_order(tmp_path: Path) -> None:
    flag = tmp_path / "slow"
    flag.touch()
    env = {
        # The pause (DELAY_ENV) is the window the kill must land in: long enough for a loaded
        # machine to see the log line and kill. The first task runs the second inline, so both
        # pauses count against the time limits.
        "BROKER_VISIBILITY_TIMEOUT": "16",
        "TASK_TIME_LIMIT": "12",
        "TASK_SOFT_TIME_LIMIT": "11",
        "RETRY_BACKOFF_MAX": "2",
        FLAG_ENV: str(flag),
        DELAY_ENV: "4000",
    }
    pipeline = LocalPipeline(workers=0, extra_env=env, worker_app=FAULT_WORKER).start(listener=False)
    processes = []
    try:
        user_id, order_id = ObjectId(), ObjectId()
        pipeline.db.users.insert_one({"_id": user_id, "email": "buyer@example.com", "name": "Buyer"})
        pipeline.db.orders.insert_one({"_id": order_id, "user_id": user_id, "status": "paid"})
        pipeline.start_listener()
        for status in STATUSES:
            pipeline.db.orders.update_one({"_id": order_id}, {"$set": {"status": status}})
        client = pipeline.redis_client()
        # 3 notifications + 3 analytics updates + 3 event-store entries, all queued before any worker
        # runs (update_analytics is batched: its events may share a message).
        assert wait_until(lambda: queued_events(client) == 9, timeout=60), queued_events(client)

        def worker(name: str) -> ManagedProcess:
            process = worker_process(
                pipeline.env, name, app=FAULT_WORKER, concurrency=4, log_dir=pipeline.log_dir
            )
            processes.append(process.start(timeout=90))
            return process

        victim = worker("chainw1")
        chained = victim.wait_for_log(
            rf"chained {re.escape(TASK)}\[([0-9a-f-]+)\] started", timeout=60
        ).group(1)
        victim.wait_for_log(rf"{WINDOW_LOG} {re.escape(TASK)} {chained}", timeout=30)
        victim.kill()  # the chained task's email went out, its done record did not
        # On a loaded machine the kill can land after the chained task's window, in the window of the
        # task it chained in turn: that one is then the task caught by the kill.
        caught = re.findall(rf"{WINDOW_LOG} {re.escape(TASK)} ([0-9a-f-]+)", victim.log_text())[-1]
        flag.unlink()
        rescuer = worker("chainw2")

        sink = pipeline.sink
        assert sink is not None
        assert wait_until(lambda: len({str(m["Message-ID"]) for m in sink.messages}) == 3, timeout=90), (
            pipeline.logs()
        )
        # The first task's message comes back (never acked, after the visibility timeout), finds itself
        # done and hands the key over again.
        assert wait_until(lambda: f"duplicate {TASK}" in rescuer.log_text(), timeout=60), rescuer.log_text()[
            -3000:
        ]
        time.sleep(2)  # quiet: a lost hand-over or a further copy would show now
        first: dict[str, str] = {}
        for message in sink.messages:
            first.setdefault(str(message["Message-ID"]), str(message["Subject"]))
        statuses = ["delivered" if "delivered" in s else "shipped" for s in first.values()]
        assert statuses == list(STATUSES), first
        doubled = {mid for mid, n in sink.count_by_message_id().items() if n > 1}
        assert doubled <= {f"<{caught}@changeflow>"}, (doubled, chained, caught)
        assert pipeline.db.changeflow_dead_letters.count_documents({}) == 0
        assert list(client.scan_iter("changeflow:order:*")) == []
        assert list(client.scan_iter("changeflow:parked:*")) == []
        client.close()
    finally:
        for process in processes:
            process.stop()
        pipeline.stop()
