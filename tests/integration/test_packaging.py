"""What `pip install changeflow` installs: the `changeflow` namespace only, clashing with no team's modules.

setuptools builds the package tree a wheel would hold (`build_py`, from this checkout's pyproject.toml,
on a copy of the checkout) into a directory of its own. The test checks that everything in it is under
`changeflow/` (the checkout's tasks/, listener/, worker/, harness/ are not in it), then imports every
built module from there in a process whose working directory holds a team's own `tasks`, `worker` and
`listener` modules, and checks that the team's modules are the ones imported and that nothing came from
the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from harness.processes import REPO_ROOT

# Not copied: git's and the tools' own files, and what earlier builds or runs left.
IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "run",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".env",
)

# Imports every built module (run in the team's directory, the built tree first on sys.path).
IMPORT_ALL = """
    import importlib, json, pkgutil, sys
    import changeflow

    names = [m.name for m in pkgutil.walk_packages(changeflow.__path__, "changeflow.")
             if m.name.rpartition(".")[2] != "__main__"]
    for name in names:
        importlib.import_module(name)
    import listener, tasks, worker

    print(json.dumps({
        "imported": names,
        "team": [listener.WHO, tasks.WHO, worker.WHO],
        "files": {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())},
        "prefix": sys.prefix,
    }))
"""


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python args...`, which must succeed."""
    completed = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def build(tmp_path: Path) -> Path:
    source, lib = tmp_path / "checkout", tmp_path / "lib"
    shutil.copytree(REPO_ROOT, source, ignore=IGNORED)
    run(["-c", "from setuptools import setup; setup()", "-q", "build_py", "--build-lib", str(lib)], source)
    return lib


def test_only_the_changeflow_namespace_is_installed(tmp_path: Path) -> None:
    lib = build(tmp_path)
    files = sorted(p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file())
    assert files, "setuptools built nothing"
    outside = [f for f in files if not f.startswith("changeflow/")]
    assert outside == [], f"installed outside the changeflow namespace: {outside}"
    for needed in (
        "changeflow/__init__.py",
        "changeflow/cli.py",
        "changeflow/listener/__main__.py",
        "changeflow/listener/stream.py",
        "changeflow/worker/settings.py",
        "changeflow/worker/consumer.py",
        "changeflow/testing/mongo_double/__main__.py",
        "changeflow/testing/mongo_double/server.py",
    ):
        assert needed in files


def test_a_team_with_modules_named_tasks_worker_listener_keeps_them(tmp_path: Path) -> None:
    lib = build(tmp_path)
    team = tmp_path / "team"
    team.mkdir()
    for name in ("tasks", "worker", "listener"):
        (team / f"{name}.py").write_text(f"WHO = 'the team\\'s {name}'\n")
    env = {**os.environ, "PYTHONPATH": str(lib)}
    completed = run(["-c", textwrap.dedent(IMPORT_ALL)], team, env)
    report = json.loads(completed.stdout)
    assert "changeflow.listener.stream" in report["imported"]
    assert "changeflow.testing.mongo_double.server" in report["imported"]
    assert report["team"] == ["the team's listener", "the team's tasks", "the team's worker"]
    # The interpreter's own packages may live inside the checkout too (scripts/install.sh's .venv).
    prefix = Path(report["prefix"])
    from_checkout = sorted(
        name
        for name, path in report["files"].items()
        if path and Path(path).is_relative_to(REPO_ROOT) and not Path(path).is_relative_to(prefix)
    )
    assert from_checkout == [], f"imported from the checkout, not the built package: {from_checkout}"
    built = {name for name, path in report["files"].items() if path and Path(path).is_relative_to(lib)}
    assert built and all(name == "changeflow" or name.startswith("changeflow.") for name in built)


def test_the_test_server_runs_from_the_built_package(tmp_path: Path) -> None:
    lib = build(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(lib)}
    completed = run(["-m", "changeflow.testing.mongo_double", "--help"], tmp_path, env)
    assert "MongoDB wire-protocol test server" in completed.stdout
