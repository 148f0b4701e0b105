"""History lost (the checkpoint fell off the oplog): gap records, --on-history-lost, reconcile."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
from bson import ObjectId

from changeflow.listener.checkpoints import CheckpointStore
from changeflow.listener.exit_codes import EXIT_HISTORY_LOST, EXIT_OK
from changeflow.listener.gaps import COLLECTION as GAPS
from changeflow.worker.keys import dedup_key
from harness.redis_server import RedisServer
from tests.card import user_insert_tasks
from tests.integration import test_listener_cli as cli
from tests.integration.test_listener import Queue, wait_for
from tests.integration.test_listener_cli import ROOT, STREAM, Process

env = cli.env  # fixtures shared with the CLI tests
processes = cli.processes

WELCOME_AND_PROFILE = ("tasks.send_welcome_email", "tasks.create_profile")

PER_USER = len(user_insert_tasks())  # task messages of one users insert


@pytest.fixture
def tiny_oplog(
    env: dict[str, str], real_mongodb: bool
) -> Iterator[tuple[dict[str, str], pymongo.database.Database]]:
    """A MongoDB test server that keeps 30 change events: easy to roll past a checkpoint."""
    if real_mongodb:
        pytest.skip("needs a MongoDB test server with a tiny oplog")
    from changeflow.testing.mongo_double import MongoDouble

    with MongoDouble(port=0, oplog_size=30) as server:
        client: pymongo.MongoClient = pymongo.MongoClient(server.uri)
        yield {**env, "MONGODB_URI": server.uri, "MONGODB_DB": "history"}, client.history
        client.close()


def listener_run_then_lose_history(
    env: dict[str, str], db: Any, queue: Queue, processes: list[Process], gap_users: int = 0
) -> list[ObjectId]:
    """A listener delivers one user and stops; then users are written and the oplog rolls past."""
    first = Process(env, "--idle-checkpoint-interval", "0.2")
    processes.append(first)
    first.wait_for_line("listener ready")
    db.users.insert_one({"email": "old@example.com"})
    wait_for(lambda: len(queue.messages()) >= 2, "the old user's tasks")
    time.sleep(1.1)  # the checkpoint's time moves to a later second than the old user's ObjectId
    db.audit.insert_one({"n": "tick"})  # unrouted: only moves the stream's position
    time.sleep(0.5)
    first.popen.terminate()
    assert first.finish() == EXIT_OK
    time.sleep(1.1)
    ids = [db.users.insert_one({"email": f"gap{n}@example.com"}).inserted_id for n in range(gap_users)]
    db.audit.insert_many([{"n": n} for n in range(60)])  # the oplog rolls past the checkpoint
    return ids


def lose_history_then_resume_now(
    env: dict[str, str], db: Any, queue: Queue, processes: list[Process]
) -> tuple[list[ObjectId], Process, dict[str, Any]]:
    """Two users written in a gap of lost history, then a listener resumed from now: the gap users'
    ids, the resumed listener (ready) and the gap record."""
    gap_ids = listener_run_then_lose_history(env, db, queue, processes, gap_users=2)
    resumed = Process({**env, "LISTENER_ON_HISTORY_LOST": "resume-now"})
    processes.append(resumed)
    resumed.wait_for_line("listener ready")
    gap = db[GAPS].find_one()
    assert gap is not None
    return gap_ids, resumed, gap


def test_fail_records_the_gap_once_and_exits_3(
    tiny_oplog: tuple[dict[str, str], Any], redis_server: RedisServer, processes: list[Process]
) -> None:
    env, db = tiny_oplog
    listener_run_then_lose_history(env, db, Queue(redis_server.url), processes)
    saved = CheckpointStore(db).load_record(STREAM)
    assert saved is not None and saved.position_time is not None

    for attempt in (1, 2):  # restarting with fail: the same gap, counted again, not duplicated
        process = Process(env)  # LISTENER_ON_HISTORY_LOST defaults to fail
        processes.append(process)
        assert process.finish() == EXIT_HISTORY_LOST
        assert "history lost for stream cli-test" in process.output
        assert "listener ready" not in process.output
        gaps = list(db[GAPS].find())
        assert len(gaps) == 1
        gap = gaps[0]
        assert gap["_id"] in process.output
        assert gap["detections"] == attempt
    assert gap["stream"] == STREAM
    assert gap["from"]["token"] == saved.token
    assert gap["from"]["time"].replace(tzinfo=None) == saved.position_time.replace(tzinfo=None)
    assert gap["to"]["token"] is None and gap["to"]["time"] > gap["from"]["time"]
    assert gap["resolved"] is False and gap["resolution"] is None
    assert CheckpointStore(db).load(STREAM) == saved.token  # left for a human to decide

    listing = subprocess.run(
        [sys.executable, "-m", "listener", "gaps"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listing.returncode == 0 and gap["_id"] in listing.stdout and "OPEN" in listing.stdout


def reconcile(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "listener", "reconcile", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_resume_now_records_the_gap_continues_and_reconcile_re_emits_the_gap(
    tiny_oplog: tuple[dict[str, str], Any], redis_server: RedisServer, processes: list[Process]
) -> None:
    env, db = tiny_oplog
    queue = Queue(redis_server.url)
    gap_ids, resumed, gap = lose_history_then_resume_now(env, db, queue, processes)
    assert "WARNING" in resumed.output and "resuming from now" in resumed.output
    assert gap["_id"] in resumed.output
    assert gap["to"]["token"] is not None and gap["resolved"] is False
    assert CheckpointStore(db).load(STREAM) != gap["from"]["token"]  # the new start is saved

    # Written after the resume, with an ObjectId of the gap's last second: the stream delivers it, and
    # reconcile finds its insert after the gap's end token and leaves it out.
    after_id = ObjectId.from_datetime(gap["to"]["time"])
    db.users.insert_one({"_id": after_id, "email": "after@example.com"})
    wait_for(
        lambda: (
            [m["payload"]["fullDocument"]["email"] for m in queue.messages()].count("after@example.com")
            == PER_USER
        ),
        "the new user's tasks",
    )
    before = len(queue.messages())
    assert before == 2 * PER_USER  # old + after: the gap users were not delivered by the stream

    dry = reconcile(env, "--gap", gap["_id"], "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would emit insert users/") == 2
    assert f"skip insert users/{after_id}: delivered by the resumed stream" in dry.stdout
    assert "old@example.com" not in dry.stdout and len(queue.messages()) == before

    expected = {
        dedup_key({"_data": f"reconcile:users:{user_id}"}, task)
        for user_id in gap_ids
        for task in user_insert_tasks()
    }
    for run in (1, 2):  # twice: the same task ids both times
        done = reconcile(env, "--gap", gap["_id"])
        assert done.returncode == 0, done.stderr
        assert f"published {2 * PER_USER} tasks" in done.stdout and "marked resolved" in done.stdout
        new = queue.messages()[before + 2 * PER_USER * (run - 1) :]
        assert {m["id"] for m in new} == expected
        assert {m["payload"]["fullDocument"]["email"] for m in new} == {
            "gap0@example.com",
            "gap1@example.com",
        }
        for message in new:
            payload = message["payload"]
            assert payload["operationType"] == "insert" and payload["ns"] == {
                "db": "history",
                "coll": "users",
            }
            assert payload["_id"]["_data"].startswith("reconcile:users:") and payload["wallTime"]
    resolved = db[GAPS].find_one({"_id": gap["_id"]})
    assert resolved is not None and resolved["resolved"] is True
    assert resolved["resolution"]["method"] == "reconcile" and resolved["resolution"]["tasks"] == 2 * PER_USER

    resumed.popen.terminate()
    assert resumed.finish() == EXIT_OK


def test_a_late_insert_the_listener_noted_is_left_out_once_the_oplog_has_rolled_past(
    tiny_oplog: tuple[dict[str, str], Any], redis_server: RedisServer, processes: list[Process]
) -> None:
    env, db = tiny_oplog
    gap_ids, resumed, gap = lose_history_then_resume_now(env, db, Queue(redis_server.url), processes)
    assert gap["to"]["token"] is not None

    # Written after the resume with an ObjectId inside the window (a late write): delivered live,
    # and noted in the gap record before the checkpoint moves past it.
    late_id = ObjectId.from_datetime(gap["to"]["time"])
    db.users.insert_one({"_id": late_id, "email": "late@example.com"})
    wait_for(
        lambda: any(
            each["id"] == late_id for each in (db[GAPS].find_one() or {}).get("to", {}).get("delivered", [])
        ),
        "the late insert noted in the gap record",
    )
    resumed.popen.terminate()
    assert resumed.finish() == EXIT_OK
    db.audit.insert_many([{"n": n} for n in range(60)])  # the gap's end and the checkpoint roll off

    dry = reconcile(env, "--gap", gap["_id"], "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "both left the oplog" in dry.stderr  # the oplog cannot tell: only the note can
    assert f"skip insert users/{late_id}: delivered by the resumed stream" in dry.stdout
    emitted = [line.split()[3] for line in dry.stdout.splitlines() if line.startswith("would emit")]
    assert sorted(emitted) == sorted(f"users/{user_id}" for user_id in gap_ids)


def test_reconcile_refuses_a_gap_without_an_end_and_unknown_gaps(
    tiny_oplog: tuple[dict[str, str], Any], redis_server: RedisServer, processes: list[Process]
) -> None:
    env, db = tiny_oplog
    listener_run_then_lose_history(env, db, Queue(redis_server.url), processes)
    failed = Process(env)
    processes.append(failed)
    assert failed.finish() == EXIT_HISTORY_LOST
    gap = db[GAPS].find_one()
    assert gap is not None
    refused = reconcile(env, "--gap", gap["_id"])
    assert refused.returncode == 2 and "no end yet" in refused.stderr
    unknown = reconcile(env, "--gap", "nope")
    assert unknown.returncode == 2 and "no gap 'nope'" in unknown.stderr
