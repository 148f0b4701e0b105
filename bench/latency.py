"""Bench 3: end-to-end latency, from a pymongo write to the task starting on a worker, at fixed rates.

Not a test. Usage: python -m bench.latency [--rates 50,200,1000] [--seconds 4] [--max-events 1000]
       [--max-await-ms 500]

The whole pipeline as real processes (harness.pipeline.LocalPipeline: private redis-server, MongoDB
test server, SMTP sink, 2 `celery -A worker worker` processes of 2 pool processes each) and the
listener (`python -m listener`, whose default publisher is the pipelined one). A writer
inserts orders with `insert_one` at the given rate (each insert routes to one task,
tasks.update_analytics). The start of each task is taken from the workers' own `task-started`
events (the ones Flower shows), matched to its write through the `task-received` event, whose
args (argsrepr) names the document; latency = started timestamp - time just before insert_one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import time
from multiprocessing.connection import Connection
from typing import Any

import redis
from bson import Decimal128, ObjectId

from bench.common import machine, percentile
from harness.pipeline import LocalPipeline
from harness.task_events import TASK_EVENTS_PATTERN, task_events

DOC_ID = re.compile(r"'documentKey': \{'_id': ObjectId\('([0-9a-f]{24})'\)")


class TaskEvents:
    """Follows the workers' task events (Redis pub/sub) in a process of its own.

    Not a thread of the writer's process: parsing every event there would hold the GIL between the
    writer's clock reading and its insert_one, adding to the very latency being measured.
    """

    def __init__(self, url: str) -> None:
        self._conn, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=_follow_events, args=(url, child), daemon=True)

    def start(self) -> None:
        self.process.start()
        if not self._conn.poll(10) or self._conn.recv() != "subscribed":
            raise RuntimeError("the task event follower did not start")

    def snapshot(self) -> tuple[dict[str, float], list[float]]:
        """(document id -> when its task started, task runtimes in seconds since the last snapshot)."""
        self._conn.send("snapshot")
        started, runtimes = self._conn.recv()
        return started, runtimes

    def close(self) -> None:
        if self.process.is_alive():
            self._conn.send("stop")
            self.process.join(5)


def _follow_events(url: str, conn: Connection) -> None:
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(TASK_EVENTS_PATTERN)
    conn.send("subscribed")
    doc_of: dict[str, str] = {}  # task id -> document id (from task-received)
    started: dict[str, float] = {}  # task id -> timestamp
    runtimes: list[float] = []  # seconds, from task-succeeded events
    while True:
        if conn.poll():
            request = conn.recv()
            if request == "stop":
                break
            conn.send(({doc_of[t]: ts for t, ts in started.items() if t in doc_of}, runtimes))
            runtimes = []
        message = pubsub.get_message(timeout=0.05)
        if message is None:
            continue
        for event in task_events(message["data"]):
            if event["type"] == "task-received":
                found = DOC_ID.search(event.get("args") or "")
                if found:
                    doc_of[event["uuid"]] = found.group(1)
            elif event["type"] == "task-started":
                started[event["uuid"]] = event["timestamp"]
            elif event["type"] == "task-succeeded":
                runtimes.append(event.get("runtime") or 0.0)
    pubsub.close()
    client.close()


def run_rate(
    pipeline: LocalPipeline, events: TaskEvents, rate: float, seconds: float, max_events: int
) -> dict[str, float]:
    count = max(1, min(max_events, int(rate * seconds)))
    orders = pipeline.db.orders
    written: dict[str, float] = {}
    t0 = time.perf_counter()
    for i in range(count):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        oid = ObjectId()
        written[str(oid)] = time.time()
        order = {"_id": oid, "user_id": ObjectId(), "status": "pending", "total": Decimal128("9.99")}
        orders.insert_one(order)
    achieved = count / (time.perf_counter() - t0)
    deadline = time.monotonic() + 120
    seen: list[float] = []
    while True:
        started, runtimes = events.snapshot()
        seen += runtimes
        if all(doc in started for doc in written) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    runtimes = [r * 1000 for r in seen]
    latencies = [(started[doc] - at) * 1000 for doc, at in written.items() if doc in started]
    return {
        "rate": rate, "achieved": achieved, "events": count, "measured": len(latencies),
        "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99),
        "max": max(latencies, default=float("nan")), "task_ms_p50": percentile(runtimes, 50),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="50,200,1000")
    parser.add_argument("--seconds", type=float, default=4.0, help="writing time per rate")
    parser.add_argument("--max-events", type=int, default=1000, help="at most this many writes per rate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-await-ms", type=int, default=500, help="LISTENER_MAX_AWAIT_MS")
    args = parser.parse_args(argv)
    print("== 3. end-to-end latency (pymongo insert_one -> task-started on a worker)")
    print(machine())
    print(
        f"{args.workers} celery workers x 2 pool processes, listener: python -m listener (pipelined), "
        f"LISTENER_MAX_AWAIT_MS={args.max_await_ms}"
    )
    rows = []
    extra_env = {"LISTENER_MAX_AWAIT_MS": str(args.max_await_ms)}
    pipeline = LocalPipeline(workers=args.workers, extra_env=extra_env).start()
    try:
        assert pipeline.redis is not None
        events = TaskEvents(pipeline.redis.url)
        events.start()
        try:
            for rate in (float(r) for r in args.rates.split(",")):
                row = run_rate(pipeline, events, rate, args.seconds, args.max_events)
                rows.append(row)
                print(
                    f"target {row['rate']:>6,.0f} ev/s, achieved {row['achieved']:>6,.0f} ev/s "
                    f"({int(row['measured']):,}/{int(row['events']):,} tasks seen) | "
                    f"p50 {row['p50']:6.1f} ms | p95 {row['p95']:6.1f} ms | p99 {row['p99']:6.1f} ms | "
                    f"max {row['max']:6.1f} ms | task runtime p50 {row['task_ms_p50']:6.1f} ms",
                    flush=True,
                )
        finally:
            events.close()
    finally:
        pipeline.stop()
    return {"rows": rows}


if __name__ == "__main__":
    main()
