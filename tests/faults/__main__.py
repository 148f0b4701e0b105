"""`python -m tests.faults [--only 1,3] [--seed N] [--logs DIR]`: run the fault scenarios, print the table.

Exit code 0 when every scenario met its expectations (a scenario whose feature is missing counts as
expected to fail, like pytest's xfail), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.faults.result import format_notes, format_table
from tests.faults.scenarios import SCENARIOS, Options, run_scenario


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="N[,N...]", help="run only these scenarios, e.g. 1,3")
    parser.add_argument(
        "--seed",
        type=int,
        default=int(os.environ.get("CHANGEFLOW_FAULTS_SEED", "4")),
        help="seed of kill moments and bad-document positions (default: $CHANGEFLOW_FAULTS_SEED or 4)",
    )
    parser.add_argument("--logs", type=Path, help="keep process logs here (default: a new temporary dir)")
    parser.add_argument("--verbose", action="store_true", help="print the logs of failed scenarios")
    args = parser.parse_args(argv)
    wanted = {int(n) for n in args.only.split(",")} if args.only else {s.number for s in SCENARIOS}
    unknown = wanted - {s.number for s in SCENARIOS}
    if unknown:
        parser.error(f"no scenario {sorted(unknown)}; there are {[s.number for s in SCENARIOS]}")
    log_root = args.logs or Path(tempfile.mkdtemp(prefix="changeflow-faults-"))
    options = Options(seed=args.seed, log_root=log_root)
    print(f"fault suite: seed {args.seed}, logs in {log_root}", flush=True)
    results = []
    started = time.monotonic()
    for scenario in SCENARIOS:
        if scenario.number not in wanted:
            continue
        print(f"scenario {scenario.number}: {scenario.title} ...", flush=True)
        result = run_scenario(scenario, options)
        results.append(result)
        print(f"  {result.verdict} in {result.elapsed:.0f} s", flush=True)
        for failure in result.failures():
            print(f"  FAILED {failure}", flush=True)
        if args.verbose and not result.passed and result.logs:
            print(result.logs, flush=True)
    print()
    print(format_table(results))
    print()
    print(format_notes(results))
    print(f"\n{len(results)} scenario(s) in {time.monotonic() - started:.0f} s; logs in {log_root}")
    ok = all(r.passed or r.xfail for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
