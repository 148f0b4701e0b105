"""`changeflow backfill` end to end: real redis-server, the MongoDB test server (or MONGODB_URI),
real `celery -A tests.e2e.backfill_app worker` processes, the backfill as its own process.

The worker app (tests/e2e/backfill_app.py) counts every run of a task body per user in `task_runs`,
so "nothing twice" is checked on executions, not only on profiles (unique by _id anyway).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from bson import ObjectId

from harness.pipeline import LocalPipeline, wait_until
from harness.processes import REPO_ROOT, ManagedProcess

pytestmark = pytest.mark.e2e

APP = "tests.e2e.backfill_app"
USERS = 5000
# The MongoDB test server finds documents by scanning (mongomock): with 5,000 users and profiles a
# task takes tens of milliseconds there, so processing one backfill takes minutes on a small machine.
PROCESSING_TIMEOUT = 900


@contextmanager
def pipeline_without_listener() -> Iterator[LocalPipeline]:
    """redis-server, MongoDB, SMTP sink and two workers of the test app; no listener (the users exist)."""
    pipeline = LocalPipeline(workers=2, worker_app=APP).start(listener=False)
    try:
        yield pipeline
    finally:
        pipeline.stop()


def insert_users(pipeline: LocalPipeline, count: int, prefix: str = "user") -> list[ObjectId]:
    users = [
        {"_id": ObjectId(), "name": f"{prefix} {i}", "email": f"{prefix}{i}@example.test"}
        for i in range(count)
    ]
    for start in range(0, count, 1000):
        pipeline.db.users.insert_many(users[start : start + 1000])
    return [u["_id"] for u in users]


def backfill(pipeline: LocalPipeline, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "changeflow", "backfill", "-A", APP, *args],
        env={**os.environ, **pipeline.env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def backfill_process(pipeline: LocalPipeline, name: str, *args: str) -> ManagedProcess:
    return ManagedProcess(
        name,
        [sys.executable, "-m", "changeflow", "backfill", "-A", APP, *args],
        env=pipeline.env,
        ready=r"backfill \w+: ",
        log_dir=pipeline.log_dir,
    ).start(timeout=60)


def runs(pipeline: LocalPipeline, task: str) -> dict[Any, int]:
    """Body runs of `task` per document _id text (task_runs)."""
    prefix = f"{task}:"
    return {
        doc["_id"][len(prefix) :]: doc["runs"]
        for doc in pipeline.db.task_runs.find({"_id": {"$regex": f"^{re.escape(prefix)}"}})
    }


def duplicates(pipeline: LocalPipeline, task: str) -> int:
    """How many deliveries the workers' dedup guard dropped as duplicates of `task`."""
    return sum(w.log_text(since_start=False).count(f"duplicate {task} ") for w in pipeline.workers)


def wait_for_profiles(pipeline: LocalPipeline, count: int) -> None:
    profiles = pipeline.db.profiles
    enough = wait_until(lambda: profiles.count_documents({}) >= count, timeout=PROCESSING_TIMEOUT)
    assert enough, pipeline.logs()


def settle(pipeline: LocalPipeline) -> None:
    """Wait until the broker's queue is empty, then a little for the tasks in flight."""
    client = pipeline.redis_client()
    assert wait_until(lambda: client.llen("celery") == 0, timeout=PROCESSING_TIMEOUT), pipeline.logs()
    time.sleep(2)


def record(pipeline: LocalPipeline, output: str) -> dict[str, Any]:
    match = re.search(r"backfill (\w+): ", output)
    assert match, output
    found = pipeline.db.changeflow_backfills.find_one({"_id": match.group(1)})
    assert found is not None
    return found


def assert_each_once(pipeline: LocalPipeline, ids: Sequence[ObjectId], task: str = "create_profile") -> None:
    counted = runs(pipeline, task)
    assert set(counted) == {str(i) for i in ids}
    assert sorted(set(counted.values())) == [1], {k: v for k, v in counted.items() if v != 1}


@pytest.mark.timeout(2400)
def test_5000_users_get_5000_profiles_and_a_second_run_does_nothing() -> None:
    with pipeline_without_listener() as pipeline:
        ids = insert_users(pipeline, USERS)
        first = backfill(pipeline, "--collection", "users", "--task", "tasks.create_profile")
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"done: {USERS} events published, 0 dead-lettered" in first.stdout, first.stdout
        wait_for_profiles(pipeline, USERS)
        settle(pipeline)
        assert pipeline.db.profiles.count_documents({}) == USERS
        assert {p["_id"] for p in pipeline.db.profiles.find({}, {"_id": 1})} == set(ids)
        assert_each_once(pipeline, ids)
        done = record(pipeline, first.stdout)
        assert (done["state"], done["counts"], done["total"]) == (
            "done",
            {"published": USERS, "dead_lettered": 0},
            USERS,
        )
        assert done["last_id"] == max(ids) and done["runs"] == 1

        # The same backfill again: the same task ids, every one dropped by the guard.
        second = backfill(pipeline, "--collection", "users", "--task", "tasks.create_profile")
        assert second.returncode == 0, second.stdout + second.stderr
        dropped = lambda: duplicates(pipeline, "tasks.create_profile")  # noqa: E731
        assert wait_until(lambda: dropped() >= USERS, timeout=PROCESSING_TIMEOUT), (
            duplicates(pipeline, "tasks.create_profile"),
            pipeline.logs(),
        )
        settle(pipeline)
        assert duplicates(pipeline, "tasks.create_profile") == USERS
        assert pipeline.db.profiles.count_documents({}) == USERS
        assert_each_once(pipeline, ids)
        listed = backfill(pipeline, "list")
        assert listed.returncode == 0 and listed.stdout.count(" done ") == 2, listed.stdout
        assert "tasks.create_profile" in listed.stdout and f"{USERS}/{USERS}" in listed.stdout


@pytest.mark.timeout(1800)
def test_interrupted_with_sigint_and_resumed_by_id_runs_each_user_once() -> None:
    with pipeline_without_listener() as pipeline:
        ids = insert_users(pipeline, USERS)
        # Slow enough (5 s) to be stopped in the middle; batches of 100 with slices of 100 per publish.
        process = backfill_process(
            pipeline, "bf-interrupted", "--collection", "users", "--task", "tasks.create_profile",
            "--batch", "100", "--rate", "1000",
        )  # fmt: skip
        try:
            backfills = pipeline.db.changeflow_backfills
            assert wait_until(
                lambda: (backfills.find_one() or {}).get("counts", {}).get("published", 0) >= 1000, 60
            )
            process.signal(signal.SIGINT)
            code = process.wait(timeout=60)
        finally:
            process.stop()
        output = process.log_text()
        assert code == 130, output
        interrupted = record(pipeline, output)
        backfill_id = interrupted["_id"]
        assert f"resume with: changeflow backfill -A {APP} resume {backfill_id}" in output, output
        published = interrupted["counts"]["published"]
        assert interrupted["state"] == "interrupted" and 1000 <= published < USERS, interrupted
        # The position is the last _id of the last published batch: exactly `published` users before it.
        assert published % 100 == 0 and interrupted["last_id"] == sorted(ids)[published - 1]
        shown = backfill(pipeline, "show", backfill_id)
        assert (
            "state:       interrupted" in shown.stdout
            and f"published:   {published} of {USERS}" in shown.stdout
        )

        resumed = backfill(pipeline, "resume", backfill_id)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"{USERS - published} documents left" in resumed.stdout, resumed.stdout
        assert f"done: {USERS} events published" in resumed.stdout, resumed.stdout
        wait_for_profiles(pipeline, USERS)
        settle(pipeline)
        assert pipeline.db.profiles.count_documents({}) == USERS
        assert_each_once(pipeline, ids)
        done = pipeline.db.changeflow_backfills.find_one({"_id": backfill_id})
        assert done is not None and (done["state"], done["runs"]) == ("done", 2)
        assert done["counts"]["published"] == USERS
        again = backfill(pipeline, "resume", backfill_id)
        assert again.returncode == 0 and "nothing to resume" in again.stdout


@pytest.mark.timeout(1800)
def test_live_inserts_and_updates_during_a_backfill_are_neither_lost_nor_overwritten() -> None:
    old_count, renamed_count, new_count = 2000, 300, 200
    with pipeline_without_listener() as pipeline:
        db = pipeline.db
        old = insert_users(pipeline, old_count, prefix="old")
        pipeline.start_listener("-A", APP)  # from now on: live events (the old users' inserts are past)
        # 2.5 batches in flight on average: documents read, their events not yet published (rate).
        process = backfill_process(
            pipeline, "bf-live", "--collection", "users", "--task", "backfill_test.user_card",
            "--batch", "200", "--rate", "400",
        )  # fmt: skip
        try:
            assert wait_until(
                lambda: (db.changeflow_backfills.find_one() or {}).get("counts", {}).get("published", 0) > 0,
                60,
            )
            rng = random.Random(11)
            renamed = rng.sample(old, renamed_count)  # each at most once: live events of one user never race
            new: list[ObjectId] = []
            for k, user_id in enumerate(renamed):
                db.users.update_one({"_id": user_id}, {"$set": {"name": f"renamed {k}"}})
                if k < new_count:
                    new.append(
                        db.users.insert_one({"name": f"new {k}", "email": f"new{k}@example.test"}).inserted_id
                    )
                time.sleep(0.008)
            code = process.wait(timeout=120)
        finally:
            process.stop()
        assert code == 0, process.log_text()

        def consistent() -> bool:
            cards = {c["_id"]: c.get("name") for c in db.user_cards.find()}
            users = {u["_id"]: u.get("name") for u in db.users.find({}, {"name": 1})}
            return cards == users

        assert wait_until(consistent, timeout=PROCESSING_TIMEOUT), pipeline.logs()
        settle(pipeline)
        cards = {c["_id"]: c.get("name") for c in db.user_cards.find()}
        users = {u["_id"]: u.get("name") for u in db.users.find({}, {"name": 1})}
        # Every user, old and new, has its card with the name it has now: no stale backfill event won.
        assert len(users) == old_count + new_count and cards == users
        assert all(cards[user_id] == f"renamed {k}" for k, user_id in enumerate(renamed))
        # The new users got their profiles from the live stream, each body once.
        assert_each_once(pipeline, new)
        assert db.profiles.count_documents({}) == new_count
        assert "Traceback" not in pipeline.logs(), pipeline.logs()
