"""Bench 2: worker throughput, tasks/s of a no-op task behind the dedup guard, 1 and 2 worker processes.

Not a test. Usage: python -m bench.worker_throughput [--tasks 3000] [--processes 1,2]

A `celery -A bench.noop_app worker --concurrency N` (changeflow's worker configuration: acks late,
prefetch 1, task events on) on a private redis-server. Once it is ready, --tasks messages of
`tasks.noop` (distinct task ids, a real-shaped event each) are pushed in one pipelined round trip;
the rate is tasks / (time until the queue is empty and nothing is unacked). Every key is then checked
done in the dedup store, so each task did go through the guard.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import redis
from celery import Celery

from bench.common import Timer, change_events, machine, wait_drained
from changeflow.listener.pipelined import PipelinedPublisher
from changeflow.listener.publish import Message
from changeflow.worker.app import celery_config
from changeflow.worker.keys import dedup_key
from changeflow.worker.settings import Settings
from harness.processes import python_module
from harness.redis_server import RedisServer

TASK = "tasks.noop"


def run_once(server: RedisServer, processes: int, count: int, offset: int) -> float:
    env = {
        "CELERY_BROKER_URL": server.url,
        "REDIS_URL": server.url,
        # Not used by a no-op task (the MongoDB client is created lazily, for dead letters only).
        "MONGODB_URI": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=500",
    }
    args = [
        "-A", "bench.noop_app", "worker", "--loglevel", "INFO", "--concurrency", str(processes),
        "--hostname", f"bench{processes}@%h", "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    worker = python_module(f"bench-worker-{processes}", "celery", *args, env=env, ready=r"ready\.")
    app = Celery("changeflow-bench", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=server.url)))
    client = redis.Redis.from_url(server.url)
    messages = [
        Message(TASK, dedup_key(event["_id"], TASK), event) for event in change_events(count, start=offset)
    ]
    publisher = PipelinedPublisher(app)
    worker.start(timeout=60)
    try:
        with Timer() as t:
            assert publisher.publish(messages) == []
            wait_drained(client, worker, time.monotonic() + 300)
        keys = [f"changeflow:done:{m.task_id}" for m in messages]
        done = sum(client.exists(*keys[i : i + 1000]) for i in range(0, len(keys), 1000))
        if done != count:
            raise RuntimeError(f"{done}/{count} keys done:\n{worker.log_text()[-3000:]}")
    finally:
        worker.stop()
        publisher.close()
        client.close()
        app.close()
    return count / t.seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--processes", default="1,2")
    args = parser.parse_args(argv)
    print("== 2. worker throughput (no-op task behind the dedup guard, celery prefork pool)")
    print(machine())
    rates: dict[int, float] = {}
    with RedisServer() as server:
        for i, processes in enumerate(int(p) for p in args.processes.split(",")):
            rates[processes] = run_once(server, processes, args.tasks, offset=i * args.tasks)
            print(f"{processes} worker process(es): {rates[processes]:>7,.0f} tasks/s ({args.tasks:,} tasks)")
    return {"rates": rates}


if __name__ == "__main__":
    main()
