"""Bench 7: the dedup guard's cost per task: a plain Celery no-op task vs changeflow's behind the guard.

Not a test. Usage: python -m bench.guard_overhead [--tasks 2000] [--repeat 3] [--pools prefork,threads]

Two workers with the same Celery configuration (changeflow's `celery_config`: acks late, prefetch 1,
task events on, the same broker transport and consumer) on the same private redis-server:
- plain: `celery -A bench.plain_app worker`, `tasks.noop` a plain `celery.Task`;
- changeflow: `celery -A bench.noop_app worker`, `tasks.noop` behind the dedup guard (bench 2's).

Each pool setting runs both, taking turns (plain first on even repeats, changeflow first on odd ones),
--repeat times; each figure is the median of its runs, all runs are printed:
- prefork: `--concurrency 1`;
- threads: `-P threads --concurrency 8 --prefetch-multiplier 8`.

A run starts its worker, pushes --tasks messages of `tasks.noop` (distinct ids, real-shaped events) in
one pipelined round trip and times until the queue is empty and nothing is unacked. Also printed: the
worker's CPU time per task (its main process and pool processes, psutil), which other load on the
machine disturbs less than the wall-time rate. Overhead = 1 - changeflow rate / plain rate.
After a changeflow run every key is checked done in the dedup store.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import psutil
import redis
from celery import Celery

from bench.common import Timer, change_events, machine, median, tree_cpu_seconds, wait_drained
from changeflow.listener.pipelined import PipelinedPublisher
from changeflow.listener.publish import Message
from changeflow.worker.app import celery_config
from changeflow.worker.keys import dedup_key
from changeflow.worker.settings import Settings
from harness.processes import python_module
from harness.redis_server import RedisServer

TASK = "tasks.noop"
APPS = {"plain": "bench.plain_app", "changeflow": "bench.noop_app"}
POOLS = {
    "prefork": ["--concurrency", "1"],
    "threads": ["-P", "threads", "--concurrency", "8", "--prefetch-multiplier", "8"],
}


def run_once(server: RedisServer, variant: str, pool: str, count: int, offset: int) -> tuple[float, float]:
    """(tasks/s, worker CPU seconds per task) of one run."""
    env = {
        "CELERY_BROKER_URL": server.url,
        "REDIS_URL": server.url,
        # Not used by a no-op task (the MongoDB client is created lazily, for dead letters only).
        "MONGODB_URI": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=500",
    }
    name = f"bench-guard-{variant}-{pool}-{offset}"
    args = [
        "-A", APPS[variant], "worker", "--loglevel", "INFO", *POOLS[pool],
        "--hostname", f"{name}@%h", "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    worker = python_module(name, "celery", *args, env=env, ready=r"ready\.")
    app = Celery("changeflow-bench", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=server.url)))
    client = redis.Redis.from_url(server.url)
    messages = [
        Message(TASK, dedup_key(event["_id"], TASK), event) for event in change_events(count, start=offset)
    ]
    publisher = PipelinedPublisher(app)
    worker.start(timeout=60)
    try:
        cpu_before = tree_cpu_seconds(psutil.Process(worker.pid))
        with Timer() as t:
            assert publisher.publish(messages) == []
            wait_drained(client, worker, time.monotonic() + 300)
        cpu = tree_cpu_seconds(psutil.Process(worker.pid)) - cpu_before
        if variant == "changeflow":
            keys = [f"changeflow:done:{m.task_id}" for m in messages]
            # The last message can be between the worker's pop and its unacked record when the loop
            # above looks: give it a moment (not timed; one task's time either way).
            deadline = time.monotonic() + 10
            while (done := sum(client.exists(*keys[i : i + 1000]) for i in range(0, count, 1000))) != count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{done}/{count} keys done:\n{worker.log_text()[-3000:]}")
                time.sleep(0.05)
    finally:
        worker.stop()
        publisher.close()
        client.close()
        app.close()
    return count / t.seconds, cpu / count


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pools", default="prefork,threads")
    args = parser.parse_args(argv)
    print("== 7. guard overhead (no-op task: plain Celery vs changeflow's dedup guard, same settings)")
    print(machine())
    results: dict[str, dict[str, Any]] = {}
    offset = 0
    with RedisServer() as server:
        for pool in args.pools.split(","):
            rates: dict[str, list[float]] = {v: [] for v in APPS}
            cpus: dict[str, list[float]] = {v: [] for v in APPS}
            for repeat in range(args.repeat):
                order = list(APPS) if repeat % 2 == 0 else list(reversed(APPS))
                for variant in order:
                    rate, cpu = run_once(server, variant, pool, args.tasks, offset)
                    offset += args.tasks
                    rates[variant].append(rate)
                    cpus[variant].append(cpu)
                    print(
                        f"  {pool:<8} {variant:<10} run {repeat + 1}: {rate:>6,.0f} tasks/s, "
                        f"{cpu * 1e6:>6,.0f} us worker CPU per task",
                        flush=True,
                    )
            plain, guarded = median(rates["plain"]), median(rates["changeflow"])
            plain_cpu, guarded_cpu = median(cpus["plain"]), median(cpus["changeflow"])
            overhead = 1 - guarded / plain
            results[pool] = {
                "plain": plain,
                "changeflow": guarded,
                "overhead": overhead,
                "plain_cpu_us": plain_cpu * 1e6,
                "changeflow_cpu_us": guarded_cpu * 1e6,
            }
            print(
                f"{pool} ({' '.join(POOLS[pool])}), medians of {args.repeat}: plain {plain:,.0f} tasks/s, "
                f"changeflow {guarded:,.0f} tasks/s: overhead {overhead:.1%}; worker CPU per task "
                f"{plain_cpu * 1e6:,.0f} -> {guarded_cpu * 1e6:,.0f} us ({args.tasks:,} tasks per run)",
                flush=True,
            )
    return results


if __name__ == "__main__":
    main()
