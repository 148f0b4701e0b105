"""Conformance with the Node.js driver (`mongodb`) and Mongoose: runs tests/mongo_double/node/*.test.js.

The Node.js tests use node's built-in test runner and connect to MONGODB_URI, which this wrapper sets
to the suite's server: a fresh MongoDB test server, or the real MongoDB 7.0 replica set named by
MONGODB_URI (as for the pymongo conformance tests). `npm ci` runs once, only when node_modules is
missing or package-lock.json changed. Skipped, with the reason, only where node or npm is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).parent / "node"
NODE_TESTS = sorted(p.name for p in NODE_DIR.glob("*.test.js"))
# Mongoose brings its own copy of the driver; the other scripts run on both lines of `mongodb`
# (package.json: `mongodb` is the 7.x line, `mongodb6` an alias of the 6.x line; lib/line.js).
RUNS = [
    pytest.param(package, script, id=f"{package}-{script.removesuffix('.test.js')}")
    for script in NODE_TESTS
    for package in (("mongodb",) if script == "mongoose.test.js" else ("mongodb", "mongodb6"))
]
# Written into node_modules after a successful `npm ci`: the package-lock.json it installed.
STAMP = NODE_DIR / "node_modules" / ".changeflow-package-lock.sha256"
NPM_CI_TIMEOUT = 600
NODE_TEST_TIMEOUT = 240


@contextlib.contextmanager
def _exclusive(name: str) -> Iterator[None]:
    """One `npm ci` at a time on this machine for this directory (pytest-xdist, parallel checkouts)."""
    key = hashlib.sha256(str(NODE_DIR).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"changeflow-{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with the test's packages installed (npm ci when needed)."""
    node_bin, npm_bin = shutil.which("node"), shutil.which("npm")
    missing = [name for name, path in (("node", node_bin), ("npm", npm_bin)) if path is None]
    if node_bin is None or npm_bin is None:
        pytest.skip(
            f"{' and '.join(missing)} not installed: the Node.js driver conformance tests need Node.js 20+"
        )
    lock_hash = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    with _exclusive("npm-ci"):
        if not STAMP.is_file() or STAMP.read_text().strip() != lock_hash:
            try:
                proc = subprocess.run(
                    [npm_bin, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
                    cwd=NODE_DIR,
                    capture_output=True,
                    text=True,
                    timeout=NPM_CI_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"npm ci in {NODE_DIR} took over {NPM_CI_TIMEOUT}s (is the npm registry reachable?)"
                )
            if proc.returncode != 0:
                pytest.fail(
                    f"npm ci in {NODE_DIR} failed (exit {proc.returncode}); it needs the npm registry or "
                    f"an npm cache holding package-lock.json's packages:\n{_tail(proc.stdout + proc.stderr)}"
                )
            STAMP.write_text(lock_hash + "\n")
    return node_bin


def _summary(report: str) -> dict[str, int]:
    """The closing counts of node's spec (an information sign, then `pass 3`) or TAP (`# pass 3`) report."""
    lines = re.finditer(r"^(?:\u2139|#) (tests|pass|fail|cancelled|skipped|todo) (\d+)$", report, re.M)
    return {m[1]: int(m[2]) for m in lines}


@pytest.mark.parametrize(("package", "script"), RUNS)
def test_node_driver(package: str, script: str, node: str, mongodb_uri: str) -> None:
    command = [
        node,
        "--test",
        "--test-concurrency=1",
        # The 6.x driver leaves a server-selection timer running after resuming a change stream,
        # which kept node alive for serverSelectionTimeoutMS after the tests had finished.
        "--test-force-exit",
        "--test-reporter=spec",
        script,
    ]
    env = {**os.environ, "MONGODB_URI": mongodb_uri, "NODE_MONGODB_PACKAGE": package, "NO_COLOR": "1"}
    try:
        proc = subprocess.run(
            command, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=NODE_TEST_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"node --test {script} ran over {NODE_TEST_TIMEOUT}s:\n{_tail(partial)}")
    output = f"$ {' '.join(command[1:])}\n{proc.stdout}\n{proc.stderr}"
    counts = _summary(proc.stdout)
    assert proc.returncode == 0, f"node --test {script} failed (exit {proc.returncode}):\n{output}"
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, output
    assert counts.get("pass", 0) > 0, f"node ran no test in {script}:\n{output}"
    if counts.get("skipped"):
        print(f"{script}: {counts['skipped']} node test(s) skipped:\n{proc.stdout}")
