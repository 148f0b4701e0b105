"""Every benchmark script runs (on tiny sizes): `python -m bench --quick`. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys

from harness.processes import REPO_ROOT


def test_all_benchmarks_run_on_tiny_sizes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,  # 6 starts one more worker
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for header in ("== 1.", "== 2.", "== 3.", "== 4.", "== 5.", "== 6.", "== 7.", "== 8.", "== 9."):
        assert header in result.stdout, output[-4000:]
    assert "machine: " in result.stdout and "Traceback" not in output
    assert "(a) core" in result.stdout and "tasks/s" in result.stdout and "p99" in result.stdout
    assert "peak RSS" in result.stdout
    assert "of unordered" in result.stdout
    assert "== 9." in result.stdout and "-> target" in result.stdout
    assert "-P threads --concurrency 10" in result.stdout and "emails/s" in result.stdout
