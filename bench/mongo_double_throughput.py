"""Throughput of the MongoDB test server (mongo_double): inserts/s from one writer, and change events/s
delivered to one concurrent watch().

Not a test. Usage: python bench/mongo_double_throughput.py [--count 10000] [--uri URI]
Without --uri it starts `python -m changeflow.testing.mongo_double --port 0` as a subprocess (its own
process, so the server and this client do not share a GIL, as in the real setup).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import mongomock
import pymongo

ROOT = Path(__file__).resolve().parents[1]


def start_double() -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mongo_double", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ready "):
        proc.kill()
        raise SystemExit(f"mongo_double did not start: {line!r}")
    return proc, line.split(" ", 1)[1]


def run(uri: str, count: int) -> dict[str, float]:
    client: pymongo.MongoClient = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000)
    coll = client["bench_mongo_double"]["events"]
    coll.drop()
    received = 0
    first_event_at = last_event_at = 0.0
    stream = coll.watch(max_await_time_ms=500)
    done = threading.Event()

    def listen() -> None:
        nonlocal received, first_event_at, last_event_at
        while received < count:
            event = stream.try_next()
            if event is None:
                continue
            if received == 0:
                first_event_at = time.perf_counter()
            received += 1
        last_event_at = time.perf_counter()
        done.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    started = time.perf_counter()
    for i in range(count):
        coll.insert_one({"i": i, "payload": "x" * 100})
    write_done = time.perf_counter()
    if not done.wait(timeout=120):
        raise SystemExit(f"only {received}/{count} events arrived within 120 s")
    stream.close()
    coll.drop()
    client.close()
    return {
        "inserts_per_s": count / (write_done - started),
        "events_per_s": count / (last_event_at - started),
        "lag_after_last_write_s": max(0.0, last_event_at - write_done),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--uri", help="a server to measure instead of a fresh mongo_double")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.system()} {platform.release()}, cores: {os.cpu_count()}")
    print(f"python {platform.python_version()}, pymongo {pymongo.version}, mongomock {mongomock.__version__}")
    proc = None
    uri = args.uri
    if uri is None:
        proc, uri = start_double()
    try:
        result = run(uri, args.count)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=15)
    print(f"server: {'mongo_double (subprocess)' if proc is not None else uri}")
    print(f"{args.count} insert_one calls, 1 writer thread, 1 collection watch() in another thread")
    print(f"inserts/s:            {result['inserts_per_s']:10.0f}")
    print(f"change events/s:      {result['events_per_s']:10.0f}  (first write to last event delivered)")
    print(f"lag after last write: {result['lag_after_last_write_s']:10.3f} s")


if __name__ == "__main__":
    main()
