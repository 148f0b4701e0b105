"""`python -m listener dead-letters list|show|replay|purge` against the MongoDB test server and a private
redis-server.

Most tests call `changeflow.listener.dead_letters.main()` in-process under
`changeflow.worker.testing.configured(...)`; a few run `python -m listener dead-letters` as a process
(the dispatch in changeflow/listener/__main__.py, --help without settings). Replayed tasks are read
back from the Redis list `celery` and decoded as a worker would.
The last test replays through a real listener, worker and SMTP sink (harness.pipeline.LocalPipeline).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from bson import ObjectId, Timestamp, json_util
from bson.regex import Regex
from pymongo.database import Database

from changeflow.listener.dead_letters import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, main
from changeflow.worker.dead_letters import COLLECTION, record_dead_letter
from changeflow.worker.keys import dedup_key
from changeflow.worker.testing import configured
from harness.pipeline import LocalPipeline, wait_until
from harness.redis_server import RedisServer
from tests.integration.test_listener import Queue

ROOT = Path(__file__).resolve().parents[2]
WELCOME = "tasks.send_welcome_email"
PROFILE = "tasks.create_profile"
T0 = datetime(2026, 11, 23, 12, 0, 0)  # naive UTC, as pymongo returns it


class Result(NamedTuple):
    code: int
    out: str
    err: str


def event(db: Database, document: Mapping[str, Any], n: int, coll: str = "users") -> dict[str, Any]:
    """A trimmed insert event, as the listener publishes it (BSON types intact)."""
    return {
        "_id": {"_data": f"8265{n:06X}000000012B0429296E1404"},
        "operationType": "insert",
        "ns": {"db": db.name, "coll": coll},
        "documentKey": {"_id": document["_id"]},
        "fullDocument": dict(document),
        "clusterTime": Timestamp(1_763_900_000, n),
        "wallTime": T0 + timedelta(seconds=n),
    }


def seed(
    db: Database,
    task: str,
    payload: Mapping[str, Any],
    *,
    reason: str = "permanent",
    error: str = "PermanentTaskError: no valid email address: None",
    failed_at: datetime = T0,
) -> str:
    """A dead letter as the worker (or the listener) records it, failed at `failed_at`; its id."""
    key = dedup_key(payload["_id"], task)
    record_dead_letter(
        db,
        task_name=task,
        task_id=key,
        payload=payload,
        error=error,
        traceback='Traceback (most recent call last):\n  File "tasks/email.py"\n' + error,
        attempts=1 if reason != "retries_exhausted" else 9,
        reason=reason,
    )
    db[COLLECTION].update_one(
        {"_id": key}, {"$set": {"first_failed_at": failed_at, "last_failed_at": failed_at}}
    )
    return key


@pytest.fixture
def env(mongodb_uri: str, db: Database, redis_server: RedisServer) -> dict[str, str]:
    return {
        "MONGODB_URI": mongodb_uri,
        "MONGODB_DB": db.name,
        "CELERY_BROKER_URL": redis_server.url,
        "REDIS_URL": redis_server.url,
    }


@pytest.fixture
def cli(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run main(argv) in-process with the test's servers configured; returns (code, stdout, stderr)."""

    def run(*argv: str) -> Result:
        capsys.readouterr()
        with configured(**env):
            code = main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_process(env: Mapping[str, str], *argv: str) -> Result:
    """`python -m listener dead-letters ...` as a process (through changeflow/listener/__main__.py)."""
    completed = subprocess.run(
        [sys.executable, "-m", "listener", "dead-letters", *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Result(completed.returncode, completed.stdout, completed.stderr)


@pytest.fixture
def queue(redis_server: RedisServer) -> Queue:
    return Queue(redis_server.url)


@pytest.fixture
def letters(db: Database) -> dict[str, str]:
    """Three letters: a welcome email (permanent), a profile (retries exhausted), an unpublishable one."""
    no_email = {"_id": ObjectId(), "name": "No Email"}
    slow = {"_id": ObjectId(), "name": "Slow", "email": "slow@example.com"}
    regex = {"_id": ObjectId(), "name": "Regex", "email": "re@example.com", "pattern": Regex("^a", "i")}
    db.users.insert_many([no_email, slow, regex])
    return {
        "welcome": seed(db, WELCOME, event(db, no_email, 1), failed_at=T0),
        "profile": seed(
            db,
            PROFILE,
            event(db, slow, 2),
            reason="retries_exhausted",
            error="AutoReconnect: connection closed\nsecond line",
            failed_at=T0 + timedelta(hours=1),
        ),
        "unpublishable": seed(
            db,
            WELCOME,
            # What an older listener stored when it refused the Regex: its repr() (see storable).
            {**event(db, regex, 3), "fullDocument": {**regex, "pattern": repr(regex["pattern"])}},
            reason="unpublishable",
            error="EncodeError: cannot serialize bson.regex.Regex at fullDocument.pattern",
            failed_at=T0 + timedelta(hours=2),
        ),
    }


def letter(db: Database, key: str) -> dict[str, Any]:
    found = db[COLLECTION].find_one({"_id": key})
    assert found is not None
    return found


# -- list, show ---------------------------------------------------------------------------------------


def test_help_needs_neither_servers_nor_valid_settings() -> None:
    broken = {"TASK_MAX_RETRIES": "many", "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = run_process(broken, "--help")
    assert result.code == EXIT_OK, result.err
    assert all(command in result.out for command in ("list", "show", "replay", "purge"))
    result = run_process(broken, "replay", "--help")
    assert result.code == EXIT_OK and "--refresh" in result.out and "--dry-run" in result.out
    result = run_process(broken, "list")
    assert result.code == EXIT_USAGE and "TASK_MAX_RETRIES must be an integer" in result.err


def test_list_as_a_process_table_and_json_lines(env: dict[str, str], letters: dict[str, str]) -> None:
    result = run_process(env, "list")
    assert result.code == EXIT_OK, result.err
    header, *rows = result.out.splitlines()
    assert header.split() == ["ID", "TASK", "REASON", "ATTEMPTS", "LAST_FAILED_AT", "REPLAYS", "ERROR"]
    # Newest failure first; the error column is the first line of the error.
    assert [row.split()[0] for row in rows] == [
        letters["unpublishable"],
        letters["profile"],
        letters["welcome"],
    ]
    assert rows[1].split()[1:6] == [PROFILE, "retries_exhausted", "9", "2026-11-23T13:00:00Z", "0"]
    assert rows[1].endswith("AutoReconnect: connection closed")

    result = run_process(env, "list", "--json")
    assert result.code == EXIT_OK, result.err
    documents = [json_util.loads(line) for line in result.out.splitlines()]
    assert [d["_id"] for d in documents] == [letters["unpublishable"], letters["profile"], letters["welcome"]]
    welcome = documents[2]
    assert isinstance(welcome["payload"]["documentKey"]["_id"], ObjectId)  # BSON types survive
    assert welcome["payload"]["clusterTime"] == Timestamp(1_763_900_000, 1)
    assert '"$date": "2026-11-23T12:00:00Z"' in result.out.splitlines()[2]  # relaxed Extended JSON


def test_list_filters(cli: Callable[..., Result], letters: dict[str, str]) -> None:
    def listed(*argv: str) -> list[str]:
        result = cli("list", *argv)
        assert result.code == EXIT_OK, result.err
        return [row.split()[0] for row in result.out.splitlines()[1:]]

    assert listed("--task", WELCOME) == [letters["unpublishable"], letters["welcome"]]
    assert listed("--reason", "permanent") == [letters["welcome"]]
    assert listed("--task", WELCOME, "--reason", "unpublishable") == [letters["unpublishable"]]
    assert listed("--since", "2026-11-23T13:00:00Z") == [letters["unpublishable"], letters["profile"]]
    assert listed("--since", "2026-11-23T14:00:00+01:00") == [letters["unpublishable"], letters["profile"]]
    assert listed("--since", "2026-11-23T13:00:01") == [letters["unpublishable"]]  # no zone: UTC
    assert listed("--limit", "1") == [letters["unpublishable"]]
    assert cli("list", "--task", "tasks.nothing").out == "no dead letters\n"


def test_show_prints_the_whole_record(
    cli: Callable[..., Result], letters: dict[str, str], db: Database
) -> None:
    result = cli("show", letters["profile"])
    assert result.code == EXIT_OK, result.err
    assert '"reason": "retries_exhausted"' in result.out
    assert '"attempts": 9' in result.out
    assert "traceback (last lines):\nTraceback (most recent call last):" in result.out

    result = cli("show", "--json", letters["profile"])
    assert json_util.loads(result.out) == letter(db, letters["profile"])

    result = cli("show", "no-such-id")
    assert result.code == EXIT_USAGE
    assert "no dead letter with id no-such-id" in result.err


# -- replay ---------------------------------------------------------------------------------------


def test_replay_by_id_sends_the_same_task_id_and_stored_payload(
    cli: Callable[..., Result], letters: dict[str, str], db: Database, queue: Queue
) -> None:
    key = letters["welcome"]
    result = cli("replay", key)
    assert result.code == EXIT_OK, result.err
    assert result.out.splitlines()[-1] == "replayed 1, skipped 0"
    [message] = queue.wait(1)
    stored = letter(db, key)
    assert (message["task"], message["id"]) == (WELCOME, key)
    assert message["payload"] == stored["payload"]  # ObjectId, Timestamp, datetime: as stored
    assert isinstance(message["payload"]["documentKey"]["_id"], ObjectId)
    assert isinstance(stored["replayed_at"], datetime) and stored["replay_count"] == 1
    assert "replayed_at" not in letter(db, letters["profile"])

    assert cli("replay", key).code == EXIT_OK  # again: same id, the worker's guard decides
    assert [m["id"] for m in queue.wait(2)] == [key, key]
    assert letter(db, key)["replay_count"] == 2
    assert db[COLLECTION].count_documents({}) == 3  # replaying keeps the records


def test_replay_by_filter_all_and_dry_run(
    cli: Callable[..., Result], letters: dict[str, str], db: Database, queue: Queue
) -> None:
    result = cli("replay", "--all", "--dry-run")
    assert result.code == EXIT_OK, result.err
    assert f"would replay {letters['welcome']} {WELCOME}" in result.out
    assert f"skipped {letters['unpublishable']} {WELCOME}: unpublishable" in result.out
    assert result.out.splitlines()[-1] == "would replay 2, skipped 1"
    time.sleep(0.2)
    assert queue.messages() == []
    assert db[COLLECTION].count_documents({"replayed_at": {"$exists": True}}) == 0

    assert cli("replay", "--reason", "retries_exhausted").code == EXIT_OK
    assert [(m["task"], m["id"]) for m in queue.wait(1)] == [(PROFILE, letters["profile"])]

    result = cli("replay", "--all")
    assert result.code == EXIT_OK
    assert result.out.splitlines()[-1] == "replayed 2, skipped 1"
    # Oldest failure first; the unpublishable letter is skipped for its stated reason.
    assert [m["id"] for m in queue.wait(3)[1:]] == [letters["welcome"], letters["profile"]]
    assert letter(db, letters["profile"])["replay_count"] == 2
    assert "replayed_at" not in letter(db, letters["unpublishable"])


def test_refresh_rereads_the_document_into_full_document(
    cli: Callable[..., Result], letters: dict[str, str], db: Database, queue: Queue
) -> None:
    key = letters["welcome"]
    stored = letter(db, key)["payload"]
    user_id = stored["documentKey"]["_id"]
    db.users.update_one({"_id": user_id}, {"$set": {"email": "fixed@example.com"}})

    result = cli("replay", "--refresh", key)
    assert result.code == EXIT_OK, result.err
    assert f"replayed {key} {WELCOME} (refreshed)" in result.out
    [message] = queue.wait(1)
    assert message["id"] == key
    assert message["payload"]["fullDocument"] == {
        "_id": user_id,
        "name": "No Email",
        "email": "fixed@example.com",
    }
    assert {k: v for k, v in message["payload"].items() if k != "fullDocument"} == {
        k: v for k, v in stored.items() if k != "fullDocument"
    }
    assert letter(db, key)["payload"] == stored  # the record keeps what failed

    db.users.delete_one({"_id": user_id})  # the user is gone: nothing to refresh from
    result = cli("replay", "--refresh", key)
    assert result.code == EXIT_OK
    assert "has no document with _id" in result.out and result.out.endswith("replayed 0, skipped 1\n")
    assert letter(db, key)["replay_count"] == 1


def test_an_unpublishable_letter_needs_refresh(
    cli: Callable[..., Result], letters: dict[str, str], db: Database, queue: Queue
) -> None:
    # An older listener refused the Regex (it is a BSON value like any other now): the stored payload
    # holds its repr(), so only the document read again can be replayed.
    key = letters["unpublishable"]
    stored = letter(db, key)
    assert stored["payload"]["fullDocument"]["pattern"].startswith("Regex(")  # a repr(), not the value

    result = cli("replay", key)
    assert result.code == EXIT_OK
    assert "repr()" in result.out and "--refresh" in result.out
    time.sleep(0.2)
    assert queue.messages() == []
    assert "replayed_at" not in letter(db, key)

    user_id = stored["payload"]["documentKey"]["_id"]
    result = cli("replay", "--refresh", key)
    assert result.code == EXIT_OK and result.out.endswith("replayed 1, skipped 0\n")
    [message] = queue.wait(1)
    assert message["id"] == key
    assert message["payload"]["fullDocument"] == {
        "_id": user_id,
        "name": "Regex",
        "email": "re@example.com",
        "pattern": Regex("^a", "i"),
    }


def test_broker_down_exits_1_and_marks_nothing(
    cli: Callable[..., Result], letters: dict[str, str], db: Database, redis_server: RedisServer, queue: Queue
) -> None:
    redis_server.stop()
    started = time.monotonic()
    result = cli("replay", "--all")
    assert time.monotonic() - started < 15
    assert result.code == EXIT_UNAVAILABLE
    assert "broker unavailable" in result.out
    assert result.out.splitlines()[-1].startswith("replayed 0, skipped 1, not replayed 2 (broker unavailable")
    assert db[COLLECTION].count_documents({"replayed_at": {"$exists": True}}) == 0

    redis_server.start()
    assert cli("replay", "--all").code == EXIT_OK
    assert len(queue.wait(2)) == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["replay"],
        ["replay", "some-id", "--all"],
        ["replay", "--all", "--task", WELCOME],
        ["purge"],
        ["purge", "--all"],
        ["list", "--since", "yesterday"],
        ["list", "--reason", "bogus"],
        ["list", "--limit", "0"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(cli: Callable[..., Result], argv: list[str]) -> None:
    assert cli(*argv).code == EXIT_USAGE


def test_an_unknown_id_replays_nothing(
    cli: Callable[..., Result], letters: dict[str, str], db: Database, queue: Queue
) -> None:
    result = cli("replay", letters["welcome"], "no-such-id")
    assert result.code == EXIT_USAGE
    assert "no dead letter with id no-such-id" in result.err
    time.sleep(0.2)
    assert queue.messages() == []
    assert "replayed_at" not in letter(db, letters["welcome"])


def test_purge(cli: Callable[..., Result], letters: dict[str, str], db: Database) -> None:
    assert cli("purge", "no-such-id").code == EXIT_USAGE
    result = cli("purge", letters["welcome"])
    assert (result.code, result.out) == (EXIT_OK, "purged 1 dead letter(s)\n")
    assert sorted(d["_id"] for d in db[COLLECTION].find()) == sorted(
        [letters["profile"], letters["unpublishable"]]
    )
    result = cli("purge", "--all", "--yes")
    assert (result.code, result.out) == (EXIT_OK, "purged 2 dead letter(s)\n")
    assert db[COLLECTION].count_documents({}) == 0


# -- end to end: a real listener and worker ---------------------------------------------------------


def test_a_replay_after_the_fix_sends_once_and_a_second_replay_is_a_duplicate() -> None:
    with LocalPipeline(workers=1, worker_concurrency=1) as pipeline:
        assert pipeline.sink is not None
        [worker] = pipeline.workers
        db = pipeline.db
        user_id = db.users.insert_one({"name": "Late Email"}).inserted_id  # no email: a permanent failure

        def dead_letter() -> dict[str, Any] | None:
            return db[COLLECTION].find_one({"task": WELCOME, "payload.documentKey._id": user_id})

        assert wait_until(lambda: dead_letter() is not None, timeout=30), pipeline.logs()
        first = dead_letter()
        assert first is not None and first["reason"] == "permanent"
        key = first["_id"]
        db.users.update_one({"_id": user_id}, {"$set": {"email": "late@example.com"}})

        # Without --refresh the stored payload (the old document, no email) fails again.
        result = run_process(pipeline.env, "replay", key)
        assert result.code == EXIT_OK, result.err
        assert wait_until(lambda: letter(db, key)["last_failed_at"] > first["last_failed_at"], timeout=20), (
            pipeline.logs()
        )

        result = run_process(pipeline.env, "replay", "--refresh", key)
        assert result.code == EXIT_OK, result.err
        [mail] = pipeline.sink.wait_for(1, timeout=20)
        assert "late@example.com" in str(mail["To"])
        assert str(mail["Message-ID"]) == f"<{key}@changeflow>"

        result = run_process(pipeline.env, "replay", "--refresh", key)  # already done: nothing happens
        assert result.code == EXIT_OK, result.err
        worker.wait_for_log(f"duplicate {WELCOME} {key}", timeout=20)
        time.sleep(0.5)
        assert pipeline.sink.count_by_message_id() == {f"<{key}@changeflow>": 1}
        assert letter(db, key)["replay_count"] == 3
