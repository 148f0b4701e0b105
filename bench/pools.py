"""Bench 6: slow effects by pool, welcome emails/s through an SMTP server that answers after 100 ms.

Not a test. Usage: python -m bench.pools [--emails 2000] [--prefork-emails 400] [--latency-ms 100]
                   [--pools prefork:2,threads:50,gevent:200] [--no-baseline]

For each pool, a `celery -A worker worker -P <pool> --concurrency N` (changeflow's worker configuration:
acks late, prefetch multiplier 1, task events on, INFO log) on a private redis-server sends
`tasks.send_welcome_email` (through the dedup guard, plain smtplib) to an SMTP sink in this process
whose every reply comes --latency-ms late (`harness.smtp_sink`, `delay_seconds`; sessions wait
concurrently, like a slow real server). Once the worker is ready, --emails messages (real-shaped users
insert events, distinct task ids) are pushed in one pipelined round trip; the rate is emails / (time until
the queue is empty and nothing is unacked), and every Message-ID must have arrived exactly once.

Each line gives the worker's CPU seconds over the run (psutil: the worker process and its pool
processes) and the target: at least 80% of min(concurrency / latency, the CPU-bound rate). The
CPU-bound rate is measured per pool, the same run against a sink that answers at once (skipped with
--no-baseline: the target is then concurrency / latency alone, and says so). Prefork runs fewer emails
(--prefork-emails): at concurrency / latency it is slow, and its rate is steady.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any

import psutil
import redis
from celery import Celery

from bench.common import Timer, change_events, machine, tree_cpu_seconds, wait_drained
from changeflow.listener.pipelined import PipelinedPublisher
from changeflow.listener.publish import Message
from changeflow.worker.app import celery_config
from changeflow.worker.keys import dedup_key
from changeflow.worker.settings import Settings
from harness.processes import ManagedProcess, worker_process
from harness.redis_server import RedisServer
from harness.smtp_sink import SmtpSink

TASK = "tasks.send_welcome_email"
TARGET_SHARE = 0.8
DEFAULT_POOLS = "prefork:2,threads:50,gevent:200"
WARM_UP = 4  # emails each worker sends before the timed run
WARM_UP_OFFSET = 10_000_000  # their events' numbers: apart from the timed runs' ones


@dataclass
class Run:
    pool: str
    concurrency: int
    latency_ms: float
    emails: int
    rate: float  # emails/s
    cpu_seconds: float  # the worker's process tree over the run


def welcome_events(count: int, offset: int) -> list[dict[str, Any]]:
    """`count` users insert events (the welcome email's), unique from `offset` on."""
    events = []
    for event in change_events(count * 3, start=offset * 3):  # a third of the mix are users inserts
        if event["ns"]["coll"] == "users":
            events.append(event)
    return events[:count]


def run_once(
    server: RedisServer,
    sink: SmtpSink,
    pool: str,
    concurrency: int,
    latency_ms: float,
    count: int,
    offset: int,
) -> Run:
    env = {
        "CELERY_BROKER_URL": server.url,
        "REDIS_URL": server.url,
        "SMTP_HOST": sink.host,
        "SMTP_PORT": str(sink.port),
        # Not used by the welcome email (the MongoDB client is created lazily, for dead letters only).
        "MONGODB_URI": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=500",
    }
    name = f"bench-{pool}{concurrency}-{latency_ms:g}ms"
    worker: ManagedProcess = worker_process(env, name, concurrency=concurrency, pool=pool)
    app = Celery("changeflow-bench", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=server.url)))
    client = redis.Redis.from_url(server.url)
    events = welcome_events(count, offset)
    messages = [Message(TASK, dedup_key(event["_id"], TASK), event) for event in events]
    # A few emails before the timed run: the worker's first tasks import and connect.
    warm_up = [
        Message(TASK, dedup_key(event["_id"], TASK), event)
        for event in welcome_events(WARM_UP, WARM_UP_OFFSET + offset)
    ]
    publisher = PipelinedPublisher(app)
    sink.delay_seconds = latency_ms / 1000
    worker.start(timeout=60)
    try:
        assert publisher.publish(warm_up) == []
        sink.wait_for(WARM_UP, timeout=120)
        wait_drained(client, worker, time.monotonic() + 120)
        sink.clear()
        tree = psutil.Process(worker.pid)
        cpu_before = tree_cpu_seconds(tree)
        with Timer() as t:
            assert publisher.publish(messages) == []
            wait_drained(client, worker, time.monotonic() + 600)
        cpu_seconds = tree_cpu_seconds(tree) - cpu_before
        by_id = sink.count_by_message_id()
        sent = {f"<{m.task_id}@changeflow>" for m in messages}
        if set(by_id) != sent or any(n != 1 for n in by_id.values()):
            doubled = sum(n - 1 for n in by_id.values())
            raise RuntimeError(
                f"{len(set(by_id) & sent)}/{count} emails arrived, {doubled} extra copies:\n"
                f"{worker.log_text()[-3000:]}"
            )
        recipients = {parseaddr(str(m["To"]))[1] for m in sink.messages}
        assert recipients == {e["fullDocument"]["email"] for e in events}
    finally:
        worker.stop()
        publisher.close()
        client.close()
        app.close()
    return Run(pool, concurrency, latency_ms, count, count / t.seconds, cpu_seconds)


def parse_pools(text: str) -> list[tuple[str, int]]:
    pools = []
    for item in text.split(","):
        name, _, concurrency = item.partition(":")
        if not name or not concurrency.isdigit() or int(concurrency) < 1:
            raise argparse.ArgumentTypeError(f"--pools takes POOL:CONCURRENCY,..., got {item!r}")
        pools.append((name, int(concurrency)))
    return pools


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=2000)
    parser.add_argument("--prefork-emails", type=int, default=400)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--pools", type=parse_pools, default=parse_pools(DEFAULT_POOLS))
    parser.add_argument("--no-baseline", action="store_true", help="do not measure the CPU-bound rate")
    args = parser.parse_args(argv)
    if args.latency_ms <= 0:
        parser.error("--latency-ms must be > 0 (a slow effect)")
    latency = f"{args.latency_ms:g} ms"
    print(f"== 6. slow effects by pool (welcome emails through an SMTP server answering in {latency})")
    print(machine())
    results: dict[str, dict[str, Any]] = {}
    offset = 0
    with RedisServer() as server, SmtpSink() as sink:
        for pool, concurrency in args.pools:
            count = args.prefork_emails if pool == "prefork" else args.emails
            baseline = None
            if not args.no_baseline:
                baseline = run_once(server, sink, pool, concurrency, 0, count, offset)
                offset += count
            slow = run_once(server, sink, pool, concurrency, args.latency_ms, count, offset)
            offset += count
            ceiling = concurrency / (args.latency_ms / 1000)
            bound = min(ceiling, baseline.rate) if baseline is not None else ceiling
            target = TARGET_SHARE * bound
            met = "met" if slow.rate >= target else "NOT met"
            label = f"-P {pool} --concurrency {concurrency}"
            cpu_bound = f"{baseline.rate:,.0f}/s" if baseline is not None else "not measured"
            print(
                f"{label:<32} {slow.rate:>7,.1f} emails/s ({count:,} emails), "
                f"worker CPU {slow.cpu_seconds:.1f} s ({1000 * slow.cpu_seconds / count:.1f} ms/email); "
                f"target >= {target:,.0f}/s "
                f"(80% of min({ceiling:,.0f}/s concurrency/latency, CPU-bound {cpu_bound})): {met}"
            )
            if baseline is not None:
                print(
                    f"{'':<32} CPU-bound (0 ms sink): {baseline.rate:>7,.1f} emails/s, worker CPU "
                    f"{baseline.cpu_seconds:.1f} s ({1000 * baseline.cpu_seconds / count:.1f} ms/email)"
                )
            results[pool] = {"slow": slow, "baseline": baseline, "target": target, "met": slow.rate >= target}
    return results


if __name__ == "__main__":
    main()
