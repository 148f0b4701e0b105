"""Bench 8: batched tasks: end-to-end latency at fixed offered rates, batching on and off side by side.

Not a test. Usage: python -m bench.batch_latency [--rates 1000,2000] [--seconds 5] [--modes on,off]
       [--workers 2] [--max-await-ms 100]

The whole pipeline as real processes (harness.pipeline.LocalPipeline: private redis-server, MongoDB
test server, SMTP sink, `celery -A ... worker` processes of 2 pool processes each, `python -m
listener`). A writer inserts orders with `insert_one` at the offered rate; each insert routes to one
task, tasks.update_analytics. "on": the repository's app (`batch=ANALYTICS_BATCH`, the listener groups
the events of one publish); "off": bench/unbatched_app.py, the same task in batches of one (a message
and a handler call per event). Latency of an event = when its count was applied (`applied_at` of its
marker in order_analytics_applied, written in the counting transaction) - the time just before its
insert_one: the effect's latency, task run included. Achieved = events written / writing time; an
offered rate is sustained when every event was counted and the writer kept up with it.

TARGET: 1,000 events/s offered, sustained, p99 < 250 ms with batching on.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC
from typing import Any

from bson import Decimal128, ObjectId
from pymongo.database import Database

from bench.common import machine, percentile
from harness.pipeline import LocalPipeline

TARGET_RATE = 1000.0
TARGET_P99_MS = 250.0
APPS = {"on": "worker", "off": "bench.unbatched_app"}


def run_rate(db: Database, rate: float, seconds: float, drain_seconds: float) -> dict[str, Any]:
    count = max(1, int(rate * seconds))
    written: dict[ObjectId, float] = {}
    t0 = time.perf_counter()
    for i in range(count):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        oid = ObjectId()
        written[oid] = time.time()
        order = {"_id": oid, "user_id": ObjectId(), "status": "pending", "total": Decimal128("9.99")}
        db.orders.insert_one(order)
    achieved = count / (time.perf_counter() - t0)
    applied: dict[ObjectId, float] = {}
    deadline = time.monotonic() + drain_seconds
    while len(applied) < count and time.monotonic() < deadline:
        time.sleep(0.2)
        for marker in db.order_analytics_applied.find(
            {"order_id": {"$in": [o for o in written if o not in applied]}}, {"order_id": 1, "applied_at": 1}
        ):
            applied[marker["order_id"]] = marker["applied_at"].replace(tzinfo=UTC).timestamp()
    latencies = [(applied[oid] - at) * 1000 for oid, at in written.items() if oid in applied]
    return {
        "rate": rate, "achieved": achieved, "events": count, "counted": len(latencies),
        "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99),
        "max": max(latencies, default=float("nan")),
    }  # fmt: skip


def sustained(row: dict[str, Any]) -> bool:
    """Every event counted, and the writer offered at least 95% of the rate asked for."""
    return row["counted"] == row["events"] and row["achieved"] >= 0.95 * row["rate"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,2000")
    parser.add_argument("--seconds", type=float, default=5.0, help="writing time per rate")
    parser.add_argument("--modes", default="on,off", help="batching on, off, or both (side by side)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-await-ms", type=int, default=100, help="LISTENER_MAX_AWAIT_MS")
    parser.add_argument("--drain-seconds", type=float, default=60.0, help="wait for the counts this long")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    print("== 8. batched tasks: end-to-end latency (pymongo insert_one -> its count applied)")
    print(machine())
    print(
        f"{args.workers} celery workers x 2 pool processes, listener: python -m listener (pipelined), "
        f"LISTENER_MAX_AWAIT_MS={args.max_await_ms}; tasks.update_analytics batch=on: up to 100 events a task"
    )
    rows = []
    for mode in args.modes.split(","):
        app = APPS[mode]
        env = {"LISTENER_MAX_AWAIT_MS": str(args.max_await_ms), "CHANGEFLOW_APP": app}
        with LocalPipeline(workers=args.workers, worker_app=app, extra_env=env) as pipeline:
            for rate in rates:
                row = {"batching": mode, **run_rate(pipeline.db, rate, args.seconds, args.drain_seconds)}
                rows.append(row)
                print(
                    f"batching {mode:>3} | offered {row['rate']:>6,.0f} ev/s, "
                    f"achieved {row['achieved']:>6,.0f} ev/s ({row['counted']:,}/{row['events']:,} counted)"
                    f" | p50 {row['p50']:7.1f} ms | "
                    f"p95 {row['p95']:7.1f} ms | p99 {row['p99']:7.1f} ms | max {row['max']:7.1f} ms"
                    f"{'' if sustained(row) else ' | NOT sustained'}",
                    flush=True,
                )
    at_target = [r for r in rows if r["batching"] == "on" and r["rate"] == TARGET_RATE]
    if at_target:
        row = at_target[0]
        met = sustained(row) and row["p99"] < TARGET_P99_MS
        print(
            f"target (batching on, {TARGET_RATE:,.0f} ev/s offered sustained, p99 < {TARGET_P99_MS:.0f} ms): "
            f"{'MET' if met else 'NOT MET'} (p99 {row['p99']:.1f} ms, achieved {row['achieved']:,.0f} ev/s, "
            f"{row['counted']:,}/{row['events']:,} counted)"
        )
    else:
        print(f"target: not measured (batching on at {TARGET_RATE:,.0f} ev/s was not in this run)")
    return {"rows": rows}


if __name__ == "__main__":
    main()
