"""-A/--app on the command line: an app that cannot run is refused at start-up, one line, exit 2.

`celery -A ... worker`, `python -m listener -A ...`, `changeflow listen -A ...` and the operator
commands, against apps written to tmp_path. Nothing here reaches a broker or MongoDB: the refusals
come first (the URLs point at a closed port all the same).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.processes import REPO_ROOT

APPS = {
    "__init__.py": "",
    "unknown.py": """
        from changeflow import Changeflow
        app = Changeflow("unknown")
        app.route("orders", "insert", "nowhere.task")
    """,
    "empty.py": """
        from changeflow import Changeflow
        app = Changeflow("empty")
    """,
    "plain.py": """
        from celery import Celery
        app = Celery("plain")
    """,
}


@pytest.fixture
def apps(tmp_path: Path) -> Path:
    package = tmp_path / "cliapps"
    package.mkdir()
    for name, text in APPS.items():
        (package / name).write_text(textwrap.dedent(text))
    return tmp_path


def run(args: list[str], root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    closed = f"127.0.0.1:{free_port()}"
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), str(REPO_ROOT)]),
        "CELERY_BROKER_URL": f"redis://{closed}/0",
        "MONGODB_URI": f"mongodb://{closed}/?replicaSet=rs0&serverSelectionTimeoutMS=2000",
        **env,
    }
    environment.pop("CHANGEFLOW_APP", None)
    environment.update(env)
    return subprocess.run(
        [sys.executable, *args], cwd=root, env=environment, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("cliapps.unknown", "invalid app: route on 'orders' ['insert'] names task 'nowhere.task'"),
        ("cliapps.empty", "invalid app: app 'empty' has no routes"),
    ],
)
def test_a_worker_refuses_an_app_that_cannot_run(apps: Path, module: str, message: str) -> None:
    result = run(["-m", "celery", "-A", module, "worker", "--loglevel", "INFO"], apps)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "listener", "-A", "cliapps.unknown"], "invalid app: -A cliapps.unknown: route on 'orders'"),
        (
            ["-m", "changeflow", "listen", "-A", "cliapps.empty"],
            "invalid app: -A cliapps.empty: app 'empty' has no",
        ),
        (["-m", "changeflow", "listen", "--app=cliapps.plain"], "is not a changeflow app"),
        (
            ["-m", "changeflow", "listen", "-A", "cliapps.missing"],
            "invalid app: -A cliapps.missing: cannot load",
        ),
        (["-m", "changeflow", "reconcile", "-A", "cliapps.unknown", "--since", "2026-01-01"], "invalid app"),
        (["-m", "changeflow", "dead-letters", "list", "-A", "cliapps.empty"], "invalid app"),
        (["-m", "changeflow", "backfill", "-Acliapps.empty", "--collection=c", "--task=t"], "invalid app"),
        (["-m", "changeflow", "listen", "-A"], "-A needs a module"),
        (["-m", "changeflow", "console", "-A", "cliapps.empty"], "invalid app"),
    ],
)
def test_the_listener_and_operator_commands_refuse_an_app_that_cannot_run(
    apps: Path, args: list[str], message: str
) -> None:
    result = run(args, apps)
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_changeflow_app_sets_the_default(apps: Path) -> None:
    result = run(["-m", "changeflow", "listen"], apps, CHANGEFLOW_APP="cliapps.unknown")
    assert result.returncode == 2
    assert "invalid app: -A cliapps.unknown" in result.stderr
    # An explicit -A wins over the variable.
    result = run(
        ["-m", "changeflow", "listen", "-A", "cliapps.empty"], apps, CHANGEFLOW_APP="cliapps.unknown"
    )
    assert "-A cliapps.empty: app 'empty' has no routes" in result.stderr


def test_changeflow_without_a_command_prints_its_usage(apps: Path) -> None:
    result = run(["-m", "changeflow"], apps)
    assert result.returncode == 2
    assert (
        "usage: changeflow {listen,dead-letters,health,gaps,reconcile,backfill,realtime,console}"
        in result.stderr
    )
    result = run(["-m", "changeflow", "bogus"], apps)
    assert (result.returncode, "unknown command 'bogus'" in result.stderr) == (2, True)
