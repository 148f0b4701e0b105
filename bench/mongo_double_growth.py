"""Bench 9: the MongoDB test server's rates as its collection grows (1k, 10k, 100k documents stored).

Not a test. Usage: python -m bench.mongo_double_growth [--sizes 1000,10000,100000] [--ops 500] [--rounds 3]
                   [--no-unique] [--uri URI]

One MongoDB test server (`python -m changeflow.testing.mongo_double`, its own process, as in the real
setup; --uri measures another server instead) and one collection with a unique index on `email`, as
the app's own collections have. The collection is grown to each size with insert_many in batches of
5000 (timed apart: "preload"), then, at that size, from one client thread, --rounds times (the best
round is shown: the one least disturbed by other load on the machine):

- inserts/s: --ops single-document insert_one calls, as the application writes;
- finds/s and updates/s: --ops find_one / update_one ($set) by `_id` of documents spread over the
  whole collection;
- change events/s: a watch() with a `$match` (operationType and ns, what the listener sends) opened
  before the inserts reads the inserts' and updates' events afterwards, timed from its first getMore
  to its last event;
- server CPU per operation (from /proc, when the server is our subprocess): less sensitive than wall
  rates to other processes on the machine.

The change-event history grows with the preload (every preloaded document is an insert event kept for
resuming, up to --oplog-size). The target: each rate at the largest size within 20% of its rate at
the smallest (ratio >= 0.80).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymongo
from bson import ObjectId
from pymongo.collection import Collection

from bench.common import machine
from harness.processes import mongo_double_process, mongo_double_uri

BATCH = 5000
TARGET = 0.80  # the largest size's rate over the smallest's
DB, COLL = "bench_growth", "users"


def server_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process, from /proc (None where that is not readable)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def preload(coll: Collection, start: int, stop: int) -> list[ObjectId]:
    """Documents start..stop-1, as a few large insert_many calls; returns their _ids."""
    ids = []
    for first in range(start, stop, BATCH):
        docs = [
            {"_id": ObjectId(), "email": f"user{i}@example.test", "name": f"User {i}", "plan": "free", "n": i}
            for i in range(first, min(stop, first + BATCH))
        ]
        coll.insert_many(docs, ordered=False)
        ids.extend(doc["_id"] for doc in docs)
    return ids


def measure(pid: int | None, count: int, work: Callable[[], None]) -> tuple[float, float | None]:
    """(operations per second, server CPU microseconds per operation)."""
    cpu_before = server_cpu_seconds(pid)
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    cpu_after = server_cpu_seconds(pid)
    cpu = None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) / count * 1e6
    return count / seconds, cpu


def run_size(
    coll: Collection, pid: int | None, size: int, ops: int, stored: list[ObjectId], rng: random.Random
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    targets = [stored[rng.randrange(len(stored))] for _ in range(ops)]
    pipeline = [{"$match": {"operationType": {"$in": ["insert", "update"]}, "ns.coll": COLL}}]
    stream = coll.watch(pipeline, max_await_time_ms=200)
    stream.try_next()  # the stream is open and placed before the writes below

    def inserts() -> None:
        for i in range(ops):
            _id = ObjectId()
            coll.insert_one({"_id": _id, "email": f"new-{_id}@example.test", "name": "New", "n": i})

    def finds() -> None:
        for _id in targets:
            if coll.find_one({"_id": _id}) is None:
                raise SystemExit(f"document {_id} not found")

    def updates() -> None:
        for _id in targets:
            if coll.update_one({"_id": _id}, {"$set": {"plan": f"paid-{ObjectId()}"}}).matched_count != 1:
                raise SystemExit(f"document {_id} not updated")

    result["inserts"] = measure(pid, ops, inserts)
    result["finds"] = measure(pid, ops, finds)
    result["updates"] = measure(pid, ops, updates)
    expected = 2 * ops

    def events() -> None:
        received = 0
        deadline = time.monotonic() + 300
        while received < expected:
            if stream.try_next() is not None:
                received += 1
            elif time.monotonic() > deadline:
                raise SystemExit(f"only {received}/{expected} change events within 300 s")

    result["events"] = measure(pid, expected, events)
    stream.close()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mongo_double_growth", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sizes", default="1000,10000,100000", help="documents stored, ascending")
    parser.add_argument("--ops", type=int, default=500, help="operations of each kind per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (the best one is shown)")
    parser.add_argument("--no-unique", action="store_true", help="no unique index on email")
    parser.add_argument("--uri", help="a server to measure instead of a fresh MongoDB test server")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    print("== 9. MongoDB test server rates as the collection grows (documents stored)")
    print(machine())
    process = None
    uri = args.uri
    if uri is None:
        process = mongo_double_process().start()
        uri = mongo_double_uri(process)
    pid = process.process.pid if process is not None and process.process is not None else None
    rng = random.Random(args.seed)
    rows: dict[int, dict[str, Any]] = {}
    try:
        client: pymongo.MongoClient = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000)
        client.drop_database(DB)
        coll = client[DB][COLL]
        if not args.no_unique:
            coll.create_index("email", unique=True)
        stored: list[ObjectId] = []
        inserted = 0  # by the measured inserts: they count towards the next size
        for size in sizes:
            count = max(0, size - inserted - len(stored))
            started = time.perf_counter()
            stored += preload(coll, len(stored), len(stored) + count)
            preload_s = time.perf_counter() - started
            rate = f"{count / preload_s:.0f} docs/s" if count else "-"
            print(
                f"  {len(stored) + inserted} documents stored (preload {preload_s:.1f} s, {rate})", flush=True
            )
            rounds = [run_size(coll, pid, size, args.ops, stored, rng) for _ in range(args.rounds)]
            inserted += args.ops * args.rounds
            # Best round: the figure least disturbed by other load on the machine.
            rows[size] = {
                kind: (
                    max(r[kind][0] for r in rounds),
                    min((r[kind][1] for r in rounds if r[kind][1] is not None), default=None),
                )
                for kind in rounds[0]
            }
        client.drop_database(DB)
        client.close()
    finally:
        if process is not None:
            process.stop()
    print(
        f"server: {'MongoDB test server (subprocess)' if process else uri}; "
        f"best of {args.rounds} rounds of {args.ops} operations of each kind"
    )
    print(
        f"{'stored':>8} {'inserts/s':>10} {'finds/s':>10} {'updates/s':>10} {'events/s':>10}"
        "   server CPU µs/op (ins/find/upd/evt)"
    )
    kinds = ("inserts", "finds", "updates", "events")
    for size, row in rows.items():
        rates = " ".join(f"{row[k][0]:10.0f}" for k in kinds)
        cpus = "/".join("-" if row[k][1] is None else f"{row[k][1]:.0f}" for k in kinds)
        print(f"{size:>8} {rates}   {cpus}")
    small, large = rows[sizes[0]], rows[sizes[-1]]
    ratios = {k: large[k][0] / small[k][0] for k in kinds}
    met = all(r >= TARGET for r in ratios.values())
    if all(small[k][1] and large[k][1] for k in kinds):
        print(
            f"server CPU per operation at {sizes[-1]} / at {sizes[0]}: "
            + ", ".join(f"{k} {large[k][1] / small[k][1]:.2f}" for k in kinds)
        )
    print(
        f"rate at {sizes[-1]} / rate at {sizes[0]}: "
        + ", ".join(f"{k} {r:.2f}" for k, r in ratios.items())
        + f"  -> target (every ratio >= {TARGET:.2f}) {'met' if met else 'NOT met'}"
    )
    print("(wall rates depend on the machine's other load; compare sizes within one run)")


if __name__ == "__main__":
    main()
