"""Bench 4: the listener's peak RSS at 1k, 10k and 100k events (it must stay flat).

Not a test. Usage: python -m bench.memory [--sizes 1000,10000,100000]

Each size runs in a fresh process (`python -m bench.memory --child N`): the listener core of bench 1
(the real Listener loop, PipelinedPublisher, checkpoints into the MongoDB test server as by
default) over N events generated lazily, so the input does not grow with N. The child reports its RSS
before the run (after imports and connections) and its peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any

import psutil
import pymongo
import redis

from bench.common import change_events, machine, run_listener_core
from bench.listener_throughput import make_app, servers
from changeflow.listener.pipelined import PipelinedPublisher


def child(size: int, redis_url: str, mongo_uri: str) -> None:
    mongo: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=10_000)
    db = mongo["bench_memory"]
    app = make_app(redis_url)
    publisher = PipelinedPublisher(app)
    run_listener_core(change_events(10), publisher, db)  # warm up: connections, lazy imports
    before = psutil.Process().memory_info().rss
    listener = run_listener_core(change_events(size, start=10), publisher, db)
    print(json.dumps({"events": listener.stats.events, "before": before, "peak": peak_rss()}))


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which (unlike getrusage's ru_maxrss) starts afresh at
    exec, so the parent's size at fork time does not leak into it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB there too (macOS: B)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--mongo-uri", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, args.redis_url, args.mongo_uri)
        return {}
    print("== 4. listener memory (peak RSS of a fresh listener process per size)")
    print(machine())
    rows = []
    with servers() as (redis_server, mongo_uri):
        client = redis.Redis.from_url(redis_server.url)
        for size in (int(s) for s in args.sizes.split(",")):
            client.flushdb()  # the private server's list would otherwise hold every size's messages
            out = subprocess.run(
                [sys.executable, "-m", "bench.memory", "--child", str(size),
                 "--redis-url", redis_server.url, "--mongo-uri", mongo_uri],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{size:>8,} events: peak RSS {row['peak'] / 2**20:6.1f} MiB "
                f"(RSS before the run {row['before'] / 2**20:6.1f} MiB)",
                flush=True,
            )
        client.flushdb()
        client.close()
    first, last = rows[0]["peak"], rows[-1]["peak"]
    print(f"peak RSS at {rows[-1]['events']:,} events vs {rows[0]['events']:,}: {last / first - 1:+.1%}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
