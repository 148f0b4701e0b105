"""`python -m bench`: every benchmark, one after the other, each printing its figures and the machine.

    python -m bench                 the full set (a few minutes)
    python -m bench --quick         tiny sizes: checks that every script runs (the smoke test uses it)
    python -m bench --only 1,4      a subset (1 listener, 2 worker, 3 latency, 4 memory, 5 ordering,
                                    6 pools, 7 guard overhead, 8 batched latency, 9 test server growth)

Every benchmark starts servers of its own (private redis-server, MongoDB test server, workers) and
stops them; nothing touches the Redis on 127.0.0.1:6379. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from bench import (
    batch_latency,
    guard_overhead,
    latency,
    listener_throughput,
    memory,
    mongo_double_growth,
    ordering_throughput,
    pools,
    worker_throughput,
)

FULL: dict[str, tuple[Callable[[list[str]], Any], list[str]]] = {
    "1": (listener_throughput.main, []),
    "2": (worker_throughput.main, []),
    "3": (latency.main, []),
    "4": (memory.main, []),
    "5": (ordering_throughput.main, []),
    "6": (pools.main, []),
    "7": (guard_overhead.main, []),
    "8": (batch_latency.main, []),
    "9": (mongo_double_growth.main, []),
}
QUICK: dict[str, list[str]] = {
    "1": ["--sizes", "200", "--naive-max", "100", "--repeat", "1", "--stream-sizes", "100"],
    "2": ["--tasks", "20", "--processes", "1"],
    "3": ["--rates", "20", "--seconds", "0.5", "--workers", "1"],
    "4": ["--sizes", "100,200"],
    "5": ["--tasks", "40"],
    "6": ["--pools", "threads:10", "--emails", "10", "--no-baseline"],
    "7": ["--tasks", "20", "--repeat", "1"],
    "8": ["--rates", "20", "--seconds", "0.5", "--workers", "1", "--modes", "on"],
    "9": ["--sizes", "50,200", "--ops", "30", "--rounds", "1"],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the scripts run")
    parser.add_argument("--only", default=",".join(FULL), help="which benchmarks, e.g. 1,4")
    args = parser.parse_args(argv)
    started = time.monotonic()
    for key in args.only.split(","):
        run, full_args = FULL[key]
        run(QUICK[key] if args.quick else full_args)
        print(flush=True)
    print(f"(all done in {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
