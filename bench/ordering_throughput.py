"""Bench 5: ordered vs unordered worker throughput: the same no-op tasks, with and without `ordered_by`.

Not a test. Usage: python -m bench.ordering_throughput [--tasks 3000] [--processes 2]

One `celery -A bench.noop_app worker --concurrency N` on a private redis-server, as bench 2. Each run
pushes --tasks messages of `tasks.noop` (one pipelined round trip, as the listener does) and times
until the queue is empty, nothing is unacked and every key's ordering set is empty:

- unordered: no ordering headers (bench 2's workload);
- ordered, many keys, spread: 4 events per order (pending -> paid -> shipped -> delivered), one key
  per order, an order's events far apart in the queue (tasks/4 keys; status changes of real orders
  come minutes apart);
- ordered, many keys, back to back: the same, each order's 4 events adjacent (a burst: most of an
  order's tasks arrive while its previous one runs, so they are parked and published again);
- ordered, 10 hot keys: every task on one of 10 keys.

Ordered messages carry the key and member headers and their members are registered first, exactly as
the listener's OrderingPublisher does. A no-op task shows the ordering's own cost at its largest;
real tasks (an SMTP round trip) dilute it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

from bench.common import Timer, change_events, machine
from changeflow.listener.ordering import OrderingPublisher
from changeflow.listener.pipelined import PipelinedPublisher
from changeflow.listener.publish import Message
from changeflow.worker.app import celery_config
from changeflow.worker.keys import dedup_key
from changeflow.worker.ordering import Order, OrderBook
from changeflow.worker.settings import Settings
from harness.processes import python_module
from harness.redis_server import RedisServer

TASK = "tasks.noop"
STATUSES = 4  # events per order

# name -> key of the i-th of `count` tasks (None: unordered)
Keying = Callable[[int, int], str | None]
WORKLOADS: dict[str, Keying] = {
    "unordered": lambda i, count: None,
    "ordered, 1 key per order (spread)": lambda i, count: f"order-{i % max(1, count // STATUSES)}",
    "ordered, 1 key per order (back to back)": lambda i, count: f"order-{i // STATUSES}",
    "ordered, 10 hot keys": lambda i, count: f"hot-{i % 10}",
}


def run_once(server: RedisServer, processes: int, count: int, offset: int, keying: Keying) -> float:
    env = {
        "CELERY_BROKER_URL": server.url,
        "REDIS_URL": server.url,
        "MONGODB_URI": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=500",
    }
    args = [
        "-A", "bench.noop_app", "worker", "--loglevel", "INFO", "--concurrency", str(processes),
        "--hostname", f"bench-ordering-{offset}@%h", "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    worker = python_module(f"bench-ordering-{offset}", "celery", *args, env=env, ready=r"ready\.")
    app = Celery("changeflow-bench", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=server.url)))
    client = redis.Redis.from_url(server.url)
    messages = []
    for i, event in enumerate(change_events(count, start=offset)):
        key = keying(i, count)
        order = Order(key, event["_id"]["_data"]) if key is not None else None
        messages.append(
            Message(TASK, dedup_key(event["_id"], TASK), event, order, "documentKey" if key else None)
        )
    publisher = OrderingPublisher(PipelinedPublisher(app), OrderBook(client))
    worker.start(timeout=60)
    try:
        with Timer() as t:
            assert publisher.publish(messages) == []
            deadline = time.monotonic() + 600
            while (
                client.llen("celery")
                or client.hlen("unacked")
                or next(client.scan_iter("changeflow:order:*"), None)
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker did not finish:\n{worker.log_text()[-3000:]}")
                time.sleep(0.01)
        keys = [f"changeflow:done:{m.task_id}" for m in messages]
        done = sum(client.exists(*keys[i : i + 1000]) for i in range(0, len(keys), 1000))
        if done != count:
            raise RuntimeError(f"{done}/{count} keys done:\n{worker.log_text()[-3000:]}")
    finally:
        worker.stop()
        app.close()
        client.close()
    return count / t.seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all workloads (best kept)")
    args = parser.parse_args(argv)
    print(f"== 5. ordered vs unordered throughput (no-op task, 1 worker x {args.processes} pool processes)")
    print(machine())
    rates: dict[str, float] = {}
    with RedisServer() as server:
        offset = 0
        for _ in range(args.repeat):
            for name, keying in WORKLOADS.items():  # alternating, so load changes hit all alike
                rate = run_once(server, args.processes, args.tasks, offset, keying)
                offset += args.tasks
                rates[name] = max(rates.get(name, 0.0), rate)
    base = rates["unordered"]
    for name, rate in rates.items():
        print(f"{name:<42} {rate:>7,.0f} tasks/s  {rate / base:>6.1%} of unordered ({args.tasks:,} tasks)")
    return {"rates": rates}


if __name__ == "__main__":
    main()
