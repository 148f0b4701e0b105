"""`python -m listener` as a process: ready line, signals, exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pymongo
import pytest
from pymongo.database import Database

from changeflow.listener.checkpoints import CheckpointStore
from changeflow.listener.exit_codes import EXIT_HISTORY_LOST, EXIT_OK, EXIT_USAGE
from harness.redis_server import RedisServer
from tests.card import user_insert_tasks
from tests.integration.test_listener import Queue, at_or_after, wait_for

ROOT = Path(__file__).resolve().parents[2]
STREAM = "cli-test"


class Process:
    """A `python -m listener` child whose stderr is collected line by line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "listener", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 20.0) -> None:
        wait_for(lambda: text in self.output or self.popen.poll() is not None, repr(text), timeout)
        assert text in self.output, f"{text!r} not logged; the listener said:\n{self.output}"

    def finish(self, timeout: float = 20.0) -> int:
        code = self.popen.wait(timeout)
        self.reader.join(5)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def env(mongodb_uri: str, db: Database, redis_server: RedisServer) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MONGODB_URI": mongodb_uri,
        "MONGODB_DB": db.name,
        "CELERY_BROKER_URL": redis_server.url,
        "LISTENER_STREAM_NAME": STREAM,
        "LISTENER_MAX_AWAIT_MS": "100",
    }


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_batch_saves_the_checkpoint_and_exits_0(
    env: dict[str, str], db: Database, redis_server: RedisServer, processes: list[Process], signum: int
) -> None:
    process = Process(env, "--log-level", "DEBUG", "--summary-interval", "0.2")
    processes.append(process)
    process.wait_for_line("listener ready")
    assert "no checkpoint for stream cli-test: starting now" in process.output

    db.users.insert_one({"email": "cli@example.com"})
    tasks = user_insert_tasks()  # the welcome email, the profile, ... (route order)
    messages = Queue(redis_server.url).wait(len(tasks))
    assert sorted(m["task"] for m in messages) == sorted(tasks)  # route order: the modules' import order
    assert {"tasks.send_welcome_email", "tasks.create_profile"} <= set(tasks)
    process.wait_for_line(f"published {len(tasks)} tasks for 1 events")  # DEBUG: each batch
    process.wait_for_line(f"1 events seen, {len(tasks)} tasks published")  # INFO: the periodic summary

    process.popen.send_signal(signum)
    assert process.finish() == EXIT_OK
    assert f"{signal.Signals(signum).name} received" in process.output
    assert "listener stopped" in process.output
    assert at_or_after(CheckpointStore(db).load(STREAM), messages[-1]["payload"]["_id"])  # type: ignore[arg-type]


def test_sigterm_on_an_idle_stream_still_saves_a_checkpoint(
    env: dict[str, str], db: Database, processes: list[Process]
) -> None:
    process = Process(env, "--stream-name", "cli-idle")  # the flag overrides LISTENER_STREAM_NAME
    processes.append(process)
    process.wait_for_line("listener ready")
    started = time.monotonic()
    process.popen.terminate()
    assert process.finish() == EXIT_OK
    assert time.monotonic() - started < 10
    assert CheckpointStore(db).load("cli-idle") is not None
    assert CheckpointStore(db).load(STREAM) is None

    again = Process(env, "--stream-name", "cli-idle")  # a restart resumes from it
    processes.append(again)
    again.wait_for_line("listener ready")
    assert "resuming stream cli-idle after checkpoint" in again.output
    again.popen.terminate()
    assert again.finish() == EXIT_OK


def test_invalid_settings_exit_with_the_usage_code(env: dict[str, str], processes: list[Process]) -> None:
    process = Process({**env, "LISTENER_BATCH_SIZE": "many"})
    processes.append(process)
    assert process.finish() == EXIT_USAGE
    assert "LISTENER_BATCH_SIZE must be an integer" in process.output


def test_checkpoint_older_than_the_oplog_exits_3(
    env: dict[str, str], redis_server: RedisServer, real_mongodb: bool, processes: list[Process]
) -> None:
    if real_mongodb:
        pytest.skip("needs a MongoDB test server with a tiny oplog")
    from changeflow.testing.mongo_double import MongoDouble

    with MongoDouble(port=0, oplog_size=5) as server:
        client: pymongo.MongoClient = pymongo.MongoClient(server.uri)
        env = {**env, "MONGODB_URI": server.uri, "MONGODB_DB": "history"}
        first = Process(env)
        processes.append(first)
        first.wait_for_line("listener ready")
        client.history.users.insert_one({"email": "old@example.com"})
        Queue(redis_server.url).wait(2)
        first.popen.terminate()
        assert first.finish() == EXIT_OK
        saved = CheckpointStore(client.history).load(STREAM)

        client.history.audit.insert_many([{"n": n} for n in range(20)])  # the oplog rolls past it

        second = Process(env)
        processes.append(second)
        assert second.finish() == EXIT_HISTORY_LOST
        assert "history lost for stream cli-test" in second.output
        assert "listener ready" not in second.output
        assert CheckpointStore(client.history).load(STREAM) == saved  # left for a human to decide
        client.close()
