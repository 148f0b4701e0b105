"""Bench 1: listener publish throughput, change events -> task messages in the broker, checkpoints included.

Not a test. Usage: python -m bench.listener_throughput [--sizes 1000,10000,100000] [--naive-max 5000]
       [--repeat 3]

For each size, with the same pre-built, real-shaped events (bench.common.change_events):
  (a)  changeflow's listener core: the real `Listener` loop (changeflow/listener/stream.py) driven by an
       iterator instead of a change stream, publishing through `PipelinedPublisher` (one round trip per
       500-event batch) and saving checkpoints into the MongoDB test server as it does by default (a
       real CheckpointStore; at most one write per LISTENER_CHECKPOINT_INTERVAL_MS, and one on stop);
  (a0) the same loop with `CeleryPublisher` (send_task per message, shared producer): the old default;
  (b)  a naive loop: messages_for + `app.send_task` per message, a checkpoint per 500 events;
  (c)  the ceiling: the message bytes (a) produced, pushed again with pipelined LPUSH, 1,000 per round
       trip, nothing else.
(a) and (c) take turns --repeat times; their medians are the figures. (a0) and (b) run once, on the
first --naive-max events only (they are slow; their rate does not depend on the size). Then,
separately, the rate through the MongoDB test server: events written first, then the Listener
(PipelinedPublisher) reads them through a real change stream until all tasks are in Redis.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pymongo
import redis
from celery import Celery
from pymongo.database import Database

from bench.common import BATCH_SIZE, STREAM, Timer, change_events, machine, median, run_listener_core
from changeflow.listener.checkpoints import CheckpointStore
from changeflow.listener.pipelined import PipelinedPublisher
from changeflow.listener.publish import CeleryPublisher, messages_for
from changeflow.listener.stream import Listener
from changeflow.worker.app import celery_config
from changeflow.worker.settings import Settings
from harness.processes import mongo_double_process, mongo_double_uri
from harness.redis_server import RedisServer
from worker import app as repo_app

ROUTES = repo_app.routes  # this repository's app (tasks/): the card's routes

LPUSH_PER_ROUND_TRIP = 1000


@contextmanager
def servers() -> Iterator[tuple[RedisServer, str]]:
    """A private redis-server and a MongoDB test server subprocess."""
    mongo = mongo_double_process().start()
    try:
        with RedisServer() as server:
            yield server, mongo_double_uri(mongo)
    finally:
        mongo.stop()


def make_app(broker_url: str) -> Celery:
    """A Celery app configured exactly like worker.app (task-sent events on), on the private Redis."""
    app = Celery("changeflow-bench", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=broker_url)))
    return app


def naive_loop(app: Celery, events: Sequence[Mapping[str, Any]], checkpoints: CheckpointStore) -> int:
    """What a first listener would do: send_task per message, a checkpoint per 500 events."""
    sent = 0
    for i, event in enumerate(events, 1):
        for message in messages_for(event, ROUTES):
            app.send_task(message.task_name, args=[message.payload], task_id=message.task_id)
            sent += 1
        if i % BATCH_SIZE == 0 or i == len(events):
            checkpoints.save(STREAM, event["_id"])
    return sent


def raw_lpush(client: redis.Redis, values: list[bytes]) -> None:
    for start in range(0, len(values), LPUSH_PER_ROUND_TRIP):
        pipe = client.pipeline(transaction=False)
        for value in values[start : start + LPUSH_PER_ROUND_TRIP]:
            pipe.lpush("celery", value)
        pipe.execute()


def bench_core(
    sizes: list[int], naive_max: int, repeat: int, redis_url: str, db: Database
) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    app = make_app(redis_url)
    rows = []
    for size in sizes:
        events = list(change_events(size))
        expected = sum(len(messages_for(e, ROUTES)) for e in events)
        row: dict[str, Any] = {"events": size, "messages": expected}

        # (a) and (c) take turns, `repeat` times each: wall-time rates on this machine move by
        # +-20 % from one run to the next, and the median of each is the figure.
        a_runs, a_cpu_runs, c_runs = [], [], []
        for _ in range(repeat):
            client.flushdb()  # the private server of this benchmark, never a shared one
            publisher = PipelinedPublisher(app)
            with Timer() as t:
                listener = run_listener_core(events, publisher, db)
            assert client.llen("celery") == expected, "not every message reached the broker"
            a_runs.append(size / t.seconds)
            a_cpu_runs.append(size / t.cpu_seconds)
            row["checkpoints"] = listener.checkpoints.saves  # type: ignore[attr-defined]
            raw = client.lrange("celery", 0, -1)[::-1]  # the same bytes, in publish order
            publisher.close()

            client.flushdb()
            with Timer() as t:
                raw_lpush(client, raw)
            assert client.llen("celery") == expected
            c_runs.append(size / t.seconds)
            del raw
        row["a"], row["a_cpu"], row["c"] = median(a_runs), median(a_cpu_runs), median(c_runs)
        row["a_runs"], row["c_runs"] = a_runs, c_runs

        sample = events[:naive_max]
        client.flushdb()
        with Timer() as t:
            run_listener_core(sample, CeleryPublisher(app), db)
        row["a0"] = len(sample) / t.seconds

        client.flushdb()
        with Timer() as t:
            naive_loop(app, sample, CheckpointStore(db))
        row["b"] = len(sample) / t.seconds
        row["sample"] = len(sample)
        rows.append(row)
        print_core_row(row)
    client.flushdb()
    client.close()
    app.close()
    return rows


def print_core_row(row: dict[str, Any]) -> None:
    print(
        f"{int(row['events']):>8,} events ({int(row['messages']):,} msgs) | "
        f"(a) core {row['a']:>8,.0f} ev/s | (a0) core+send_task {row['a0']:>6,.0f} | "
        f"(b) naive {row['b']:>6,.0f} | (c) raw LPUSH {row['c']:>8,.0f} | "
        f"a/b {row['a'] / row['b']:5.1f}x | a/c {row['a'] / row['c']:5.1%} | "
        f"(a) per CPU-second {row['a_cpu']:>7,.0f} | {int(row['checkpoints'])} checkpoint saves\n"
        f"    medians of {len(row['a_runs'])} runs each: "
        f"(a) {', '.join(f'{r:,.0f}' for r in row['a_runs'])}; "
        f"(c) {', '.join(f'{r:,.0f}' for r in row['c_runs'])}"
        + ("" if row["sample"] == row["events"] else f"   [(a0),(b) on the first {int(row['sample']):,}]"),
        flush=True,
    )


def bench_through_test_server(sizes: list[int], redis_url: str, mongo_uri: str) -> list[dict[str, float]]:
    """Events written first (listener stopped), then read back through a real change stream."""
    rows = []
    client = redis.Redis.from_url(redis_url)
    mongo: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=10_000)
    app = make_app(redis_url)
    for size in sizes:
        db = mongo[f"bench_stream_{size}"]
        client.flushdb()
        settings = Settings(listener_stream_name=STREAM, listener_batch_size=BATCH_SIZE)

        def listener_for(db: Database = db, settings: Settings = settings) -> Listener:
            return Listener(db, PipelinedPublisher(app), CheckpointStore(db), ROUTES, settings=settings)

        first = listener_for()  # saves "now" as the checkpoint, then stops
        thread = threading.Thread(target=first.run, daemon=True)
        thread.start()
        if not first.ready.wait(30):
            raise RuntimeError("listener did not start")
        first.stop()
        thread.join(30)
        docs = [{"email": f"user{i}@example.test", "name": f"User {i}"} for i in range(size)]
        for start in range(0, size, 1000):
            db.users.insert_many(docs[start : start + 1000])
        expected = 2 * size  # a users insert: welcome email + profile
        client.flushdb()
        listener = listener_for()
        thread = threading.Thread(target=listener.run, daemon=True)
        with Timer() as t:
            thread.start()
            while client.llen("celery") < expected:
                time.sleep(0.005)
        listener.stop()
        thread.join(30)
        rows.append({"events": size, "rate": size / t.seconds})
        print(f"{size:>8,} events through the MongoDB test server: {size / t.seconds:>8,.0f} ev/s")
        mongo.drop_database(db.name)
    mongo.close()
    client.close()
    app.close()
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--naive-max", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of (a) and (c) per size (median)")
    parser.add_argument("--stream-sizes", default="1000,10000", help="sizes through the MongoDB test server")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print("== 1. listener publish throughput (events -> task messages in Redis, checkpoints included)")
    print(machine())
    print(
        f"batches of {BATCH_SIZE} events, one pipelined round trip each; checkpoints (MongoDB test server) "
        "at most once per LISTENER_CHECKPOINT_INTERVAL_MS (1 s, the default) and on stop"
    )
    with servers() as (redis_server, mongo_uri):
        mongo: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=10_000)
        core = bench_core(sizes, args.naive_max, args.repeat, redis_server.url, mongo["bench_core"])
        mongo.close()
        print("through a real change stream of the MongoDB test server (Listener + PipelinedPublisher):")
        stream = bench_through_test_server(
            [int(s) for s in args.stream_sizes.split(",") if s], redis_server.url, mongo_uri
        )
    return {"core": core, "stream": stream, "pid": os.getpid()}


if __name__ == "__main__":
    main()
