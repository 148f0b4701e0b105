"""The command line (`python -m changeflow.testing.mongo_double`) and bounded change history (--oplog-size).

These start their own test server as a subprocess, so they run the same with or without MONGODB_URI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pymongo
import pytest
from pymongo.errors import OperationFailure

from tests.mongo_double.helpers import assert_no_event, next_event, take_events

ROOT = Path(__file__).resolve().parents[2]


class Double:
    def __init__(self, *args: str) -> None:
        if "--port" not in args:
            args = ("--port", "0", *args)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "changeflow.testing.mongo_double", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.ready_line = self.proc.stdout.readline().strip()
        assert self.ready_line.startswith("ready mongodb://127.0.0.1:"), self.ready_line
        self.uri = self.ready_line.split(" ", 1)[1]
        self.client: pymongo.MongoClient = pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=10_000)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def small_oplog() -> Iterator[Double]:
    double = Double("--oplog-size", "5")
    yield double
    double.stop()


def test_cli_ready_line_and_sigterm() -> None:
    double = Double()
    assert (
        double.ready_line
        == f"ready mongodb://127.0.0.1:{double.uri.split(':')[2].split('/')[0]}/?replicaSet=rs0"
    )
    assert double.uri.endswith("/?replicaSet=rs0")
    double.client.t.c.insert_one({"_id": 1})
    assert double.client.t.c.find_one() == {"_id": 1}
    assert double.stop(signal.SIGTERM) == 0
    assert double.proc.stdout is not None and double.proc.stdout.read() == ""  # exactly one line


def test_cli_explicit_host_and_port() -> None:
    with socket.socket() as probe:  # a port that is free right now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    double = Double("--host", "127.0.0.1", "--port", str(port))
    try:
        assert double.ready_line == f"ready mongodb://127.0.0.1:{port}/?replicaSet=rs0"
        assert double.client.admin.command("hello")["hosts"] == [f"127.0.0.1:{port}"]
    finally:
        assert double.stop() == 0


def test_sigterm_while_a_change_stream_waits() -> None:
    double = Double()
    # A short server selection timeout: after the shutdown pymongo's resume attempt gives up quickly.
    client: pymongo.MongoClient = pymongo.MongoClient(double.uri, serverSelectionTimeoutMS=500)
    stream = client.t.c.watch(max_await_time_ms=10_000)
    errors: list[BaseException] = []

    def wait_for_event() -> None:
        try:
            stream.try_next()
        except Exception as exc:  # the server went away: expected
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_event, daemon=True)
    waiter.start()
    time.sleep(0.2)  # let the getMore start waiting on the server
    started = time.monotonic()
    double.proc.send_signal(signal.SIGTERM)
    assert double.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5  # a waiting getMore does not hold shutdown up
    waiter.join(timeout=15)
    client.close()
    double.stop()


def test_cli_sigint_exits_zero() -> None:
    double = Double()
    double.client.admin.command("ping")
    assert double.stop(signal.SIGINT) == 0


def test_history_lost_when_token_older_than_oplog(small_oplog: Double) -> None:
    coll = small_oplog.client.t.c
    with coll.watch(max_await_time_ms=100) as stream:
        coll.insert_one({"_id": 0})
        old_token = next_event(stream)["_id"]
        coll.insert_many([{"_id": i} for i in range(1, 11)])  # pushes event 0 and 1..5 out of a 5-event log
    with pytest.raises(OperationFailure) as info, coll.watch(resume_after=old_token) as s:
        s.try_next()
    assert info.value.code == 286
    assert info.value.has_error_label("NonResumableChangeStreamError")


def test_start_at_operation_time_older_than_oplog(small_oplog: Double) -> None:
    coll = small_oplog.client.t.c
    with small_oplog.client.start_session() as session:
        coll.insert_one({"_id": 0}, session=session)
        start = session.operation_time
    coll.insert_many([{"_id": i} for i in range(1, 11)])
    with pytest.raises(OperationFailure) as info, coll.watch(start_at_operation_time=start) as s:
        s.try_next()
    assert info.value.code == 286


def test_latest_and_idle_tokens_resume_after_trimming(small_oplog: Double) -> None:
    coll = small_oplog.client.t.c
    with coll.watch(max_await_time_ms=100) as stream:
        assert stream.try_next() is None
        empty_log_token = stream.resume_token  # no event exists at all yet
        events = []
        for chunk in range(3):  # read as we go: a stream that falls 5 events behind loses history
            coll.insert_many([{"_id": chunk * 4 + i} for i in range(4)])
            events += take_events(stream, 4)
        assert stream.try_next() is None
        idle_token = stream.resume_token
    assert idle_token is not None and idle_token["_data"] >= events[-1]["_id"]["_data"]
    # The empty-log token is older than what is kept now.
    with pytest.raises(OperationFailure), coll.watch(resume_after=empty_log_token) as s:
        s.try_next()
    with (
        coll.watch(resume_after=events[-1]["_id"], max_await_time_ms=100) as from_latest,
        coll.watch(resume_after=idle_token, max_await_time_ms=100) as from_idle,
    ):
        assert_no_event(from_latest)
        assert_no_event(from_idle)
        coll.insert_one({"_id": "new"})
        for resumed in (from_latest, from_idle):
            assert next_event(resumed)["documentKey"] == {"_id": "new"}
            assert_no_event(resumed)


def test_idle_token_on_empty_server_resumes(small_oplog: Double) -> None:
    coll = small_oplog.client.t.c
    with coll.watch(max_await_time_ms=100) as stream:
        assert stream.try_next() is None
        token = stream.resume_token
    coll.insert_one({"_id": 1})
    with coll.watch(resume_after=token, max_await_time_ms=100) as resumed:
        assert next_event(resumed)["documentKey"] == {"_id": 1}


def test_malformed_message_is_logged(small_oplog: Double) -> None:
    import struct

    host, port = small_oplog.client.address or ("127.0.0.1", 0)
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(struct.pack("<iiii", 20, 1, 0, 4242) + b"\x00" * 4)
        assert sock.recv(1) == b""
    assert small_oplog.client.admin.command("ping")["ok"] == 1.0
    small_oplog.stop()
    assert small_oplog.proc.stderr is not None
    assert "malformed message" in small_oplog.proc.stderr.read()
