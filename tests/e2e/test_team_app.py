"""A team's own package outside this repository, run with `-A`: `changeflow listen` and two celery workers.

The package is written to tmp_path with three effects declared as in the README (one with `match`, one
with `when`, one stacked, one of them in a second module found by discovery). The processes run with
cwd = tmp_path against a private redis-server and the MongoDB test server (or MONGODB_URI), and the
test checks the exact effects of matching and non-matching writes. The same package named `tasks`
(this repository has a `tasks` package too) must be the one found.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from harness.pipeline import LocalPipeline, wait_until
from harness.processes import REPO_ROOT, ManagedProcess, worker_process

pytestmark = pytest.mark.e2e

EFFECTS = """
    import os

    import pymongo

    from changeflow import Changeflow, FieldChanged, current_key

    app = Changeflow("{package}")
    _clients = {{}}


    def record(effect, event):
        # The team's own I/O: one client per process (prefork children get their own).
        client = _clients.get(os.getpid())
        if client is None:
            client = _clients[os.getpid()] = pymongo.MongoClient(os.environ["MONGODB_URI"])
        client[os.environ["MONGODB_DB"]].effects.update_one(
            {{"_id": current_key()}},
            {{"$setOnInsert": {{"effect": effect, "doc": event["documentKey"]["_id"],
                               "op": event["operationType"]}}}},
            upsert=True,
        )


    @app.on("invoices", "insert", match={{"fullDocument.total": {{"$gte": 1000}}}})
    def archive_large(event):
        record("archive_large", event)


    @app.on("invoices", "update", when=FieldChanged("status"))
    @app.on("invoices", "insert", match={{"fullDocument.tags": "urgent"}})
    def notify_finance(event):
        record("notify_finance", event)
"""

AUDIT = """
    from {package}.effects import app, record
    from changeflow import FieldChanged


    # A queue of its own: only the worker started with `-Q audit` runs it.
    @app.on("invoices", "update", when=FieldChanged("status"), name="{package}.audit_status", queue="audit")
    def audit_status(event):
        record("audit_status", event)
"""

PUBLISHED = re.compile(r"(\d+) events seen, (\d+) tasks published")


def write_package(root: Path, package: str) -> None:
    directory = root / package
    directory.mkdir()
    (directory / "__init__.py").write_text("")
    (directory / "effects.py").write_text(textwrap.dedent(EFFECTS.format(package=package)))
    (directory / "audit.py").write_text(textwrap.dedent(AUDIT.format(package=package)))


def last_summary(process: ManagedProcess) -> tuple[int, int]:
    found = PUBLISHED.findall(process.log_text(since_start=False))
    return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)


@pytest.mark.parametrize("package", ["acme_effects_pkg", "tasks"])
def test_a_teams_package_runs_with_dash_a(tmp_path: Path, package: str) -> None:
    write_package(tmp_path, package)
    app = f"{package}.effects"
    # The team's directory first: its package wins over anything else of the same name (this
    # repository's `tasks`); the repository after it, for changeflow itself (here from the checkout).
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    pipeline = LocalPipeline(workers=0, extra_env=env).start(listener=False)  # redis, MongoDB, SMTP only
    try:
        pipeline_env = pipeline.env
        # team1 consumes Celery's default queue, team2 only the audit task's own queue.
        workers = [
            worker_process(
                pipeline_env, name, app=app, concurrency=2, log_dir=pipeline.log_dir, cwd=tmp_path,
                queues=queues,
            )
            for name, queues in (("team1", ["celery"]), ("team2", ["audit"]))
        ]  # fmt: skip
        listener: ManagedProcess | None = None
        try:
            for worker in workers:
                worker.start(timeout=90)
                banner = worker.log_text(since_start=False)
                for task in (f"{app}.archive_large", f"{app}.notify_finance", f"{package}.audit_status"):
                    assert task in banner, f"worker has not registered {task}:\n{banner[-3000:]}"
            listener = ManagedProcess(
                "team-listener",
                [
                    sys.executable,
                    "-m",
                    "changeflow",
                    "listen",
                    "-A",
                    app,
                    "--summary-interval",
                    "0.3",
                    "--health-file",
                    str(tmp_path / "health.json"),
                ],
                env=pipeline_env,
                ready=r"listener ready",
                log_dir=pipeline.log_dir,
                cwd=tmp_path,
            ).start(timeout=60)
            assert re.search(rf"app {package}: 4 routes to 3 tasks", listener.log_text()), listener.log_text()
            db = pipeline.db
            db.invoices.insert_one({"_id": "large", "total": 1500, "tags": []})  # archive_large
            db.invoices.insert_one({"_id": "urgent", "total": 10, "tags": ["x", "urgent"]})  # notify_finance
            db.invoices.insert_one({"_id": "plain", "total": 999.5, "tags": ["x"]})  # nothing
            db.invoices.update_one({"_id": "plain"}, {"$set": {"status": "paid"}})  # notify + audit
            db.invoices.update_one({"_id": "large"}, {"$set": {"note": "x"}})  # nothing
            db.invoices.delete_one({"_id": "urgent"})  # nothing
            db.others.insert_one({"_id": "elsewhere", "total": 5000, "tags": ["urgent"]})  # nothing
            db.invoices.insert_one({"_id": "last", "total": 1000})  # archive_large: the last one

            expected = {
                ("archive_large", "large", "insert"),
                ("notify_finance", "urgent", "insert"),
                ("notify_finance", "plain", "update"),
                ("audit_status", "plain", "update"),
                ("archive_large", "last", "insert"),
            }

            def effects() -> set[tuple[str, Any, str]]:
                return {(e["effect"], e["doc"], e["op"]) for e in db.effects.find()}

            logs = pipeline.logs() + "\n".join(
                p.log_text(since_start=False)[-3000:] for p in [*workers, listener]
            )
            assert wait_until(lambda: effects() >= expected, timeout=90), f"{effects()}\n{logs}"
            # Every event the listener took published exactly the tasks above: nothing else is on its way.
            assert wait_until(lambda: last_summary(listener)[1] == len(expected), timeout=30), (
                last_summary(listener),
                listener.log_text(since_start=False)[-3000:],
            )
            assert last_summary(listener) == (4, 5)  # 4 routed events (3 inserts, 1 update), 5 tasks
            assert db.effects.count_documents({}) == len(expected)
            assert effects() == expected
            # Each task went to its queue: the audit task to team2 alone, the others to team1 alone.
            received = [
                re.findall(r"Task ([\w.]+)\[[0-9a-f-]+\] received", w.log_text(since_start=False))
                for w in workers
            ]
            assert set(received[1]) == {f"{package}.audit_status"}, received
            assert f"{package}.audit_status" not in received[0] and len(received[0]) == 4, received
        finally:
            for process in [listener, *workers]:
                if process is not None:
                    process.stop()
    finally:
        pipeline.stop()
