"""Several listeners on one stream: one active (the lease holder), the others standby; fenced checkpoints."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from pymongo.database import Database

from changeflow.listener.checkpoints import CheckpointStore, FencedOut
from changeflow.listener.exit_codes import EXIT_OK
from changeflow.listener.lease import COLLECTION as LEASES
from changeflow.listener.lease import Lease, LeaseLost
from harness.redis_server import RedisServer
from tests.card import user_insert_tasks
from tests.integration import test_listener_cli as cli
from tests.integration.test_listener import Queue, wait_for
from tests.integration.test_listener_cli import STREAM, Process

env = cli.env  # the fixtures of the CLI tests: env for a listener process, processes killed at the end
processes = cli.processes

TAKEOVER_TIMEOUT = 20.0  # generous; the figure itself is printed (default TTL 6 s, renew 2 s)

PER_USER = len(user_insert_tasks())  # task messages of one users insert


def emails(queue: Queue) -> dict[str, set[str]]:
    """email -> the task ids published for it."""
    found: dict[str, set[str]] = {}
    for message in queue.messages():
        found.setdefault(message["payload"]["fullDocument"]["email"], set()).add(message["id"])
    return found


def start(env: dict[str, str], tmp_path: Path, name: str, processes: list[Process]) -> Process:
    process = Process({**env, "LISTENER_HEALTH_FILE": str(tmp_path / f"{name}.json")})
    processes.append(process)
    return process


def test_standby_takes_over_when_the_active_listener_is_killed(
    env: dict[str, str],
    db: Database,
    redis_server: RedisServer,
    processes: list[Process],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue = Queue(redis_server.url)
    first = start(env, tmp_path, "a", processes)
    first.wait_for_line("listener ready")
    second = start(env, tmp_path, "b", processes)
    second.wait_for_line("listener standby")
    assert "listener ready" not in second.output
    assert "active for stream cli-test (epoch 1" in first.output

    db.users.insert_one({"email": "before@example.com"})
    wait_for(
        lambda: len(emails(queue).get("before@example.com", ())) == PER_USER, "the active listener to publish"
    )

    first.popen.kill()  # SIGKILL: no release, the lease has to expire
    killed = time.monotonic()
    db.users.insert_one({"email": "during@example.com"})  # written while nobody is active
    second.wait_for_line("listener ready", timeout=TAKEOVER_TIMEOUT)
    takeover = time.monotonic() - killed
    with capsys.disabled():
        print(f"\nlistener takeover after SIGKILL of the active one: {takeover:.2f}s")
    assert "active for stream cli-test (epoch 2" in second.output

    db.users.insert_one({"email": "after@example.com"})
    wanted = {"before@example.com", "during@example.com", "after@example.com"}
    wait_for(lambda: all(len(emails(queue).get(e, ())) == PER_USER for e in wanted), "every user's tasks")
    lease = db[LEASES].find_one({"_id": STREAM})
    assert lease is not None and lease["epoch"] == 2
    assert f"owner {lease['owner']})" in second.output
    record = CheckpointStore(db).load_record(STREAM)
    assert record is not None and record.epoch == 2  # claimed by the new leader

    second.popen.terminate()
    assert second.finish() == EXIT_OK


def test_a_clean_stop_hands_over_at_once(
    env: dict[str, str], db: Database, redis_server: RedisServer, processes: list[Process], tmp_path: Path
) -> None:
    first = start(env, tmp_path, "a", processes)
    first.wait_for_line("listener ready")
    second = start(env, tmp_path, "b", processes)
    second.wait_for_line("listener standby")
    first.popen.terminate()  # releases the lease
    assert first.finish() == EXIT_OK
    stopped = time.monotonic()
    second.wait_for_line("listener ready", timeout=10)
    assert time.monotonic() - stopped < 5  # the standby's poll interval (1 s), not the TTL
    db.users.insert_one({"email": "handover@example.com"})
    Queue(redis_server.url).wait(2)
    second.popen.terminate()
    assert second.finish() == EXIT_OK


def test_a_stale_epoch_cannot_overwrite_a_newer_checkpoint(db: Database) -> None:
    store = CheckpointStore(db)
    store.save("s", {"_data": "8201"}, epoch=1)
    store.claim("s", 2)  # the new leader, before it loads the checkpoint
    with pytest.raises(FencedOut):
        store.save("s", {"_data": "8202"}, epoch=1)  # the former leader, still running
    assert store.load("s") == {"_data": "8201"}
    assert db.changeflow_checkpoints.count_documents({}) == 1  # no second document
    store.save("s", {"_data": "8203"}, epoch=2)
    store.save("s", {"_data": "8204"}, epoch=3)
    with pytest.raises(FencedOut):
        store.save("s", {"_data": "8205"}, epoch=2)
    record = store.load_record("s")
    assert record is not None and record.token == {"_data": "8204"} and record.epoch == 3
    with pytest.raises(FencedOut):
        store.claim("s", 2)
    store.claim("new-stream", 1)  # a stream without a checkpoint: claimed, but no position yet
    assert store.load("new-stream") is None


def test_lease_expires_and_the_former_holder_finds_out(db: Database) -> None:
    a = Lease(db, "s", owner="a", ttl_seconds=0.6, renew_seconds=0.2)
    b = Lease(db, "s", owner="b", ttl_seconds=0.6, renew_seconds=0.2)
    assert a.try_acquire() and a.epoch == 1
    assert not b.try_acquire()
    assert b.holder is not None and (b.holder.owner, b.holder.epoch) == ("a", 1)
    a.renew()
    time.sleep(0.8)  # a stalls past its TTL
    assert b.try_acquire() and b.epoch == 2
    with pytest.raises(LeaseLost, match="taken over by b"):
        a.renew()
    assert not a.held
    b.release()
    assert a.try_acquire() and a.epoch == 3  # released: free at once


SHORT_LEASE = {"LISTENER_LEASE_TTL_SECONDS": "2", "LISTENER_LEASE_RENEW_SECONDS": "1"}


def test_a_stalled_leader_is_replaced_and_steps_down_when_it_wakes_up(
    env: dict[str, str], db: Database, redis_server: RedisServer, processes: list[Process], tmp_path: Path
) -> None:
    env = {**env, **SHORT_LEASE}
    queue = Queue(redis_server.url)
    first = start(env, tmp_path, "a", processes)
    first.wait_for_line("listener ready")
    second = start(env, tmp_path, "b", processes)
    second.wait_for_line("listener standby")

    os.kill(first.popen.pid, signal.SIGSTOP)  # alive but stuck: it stops renewing
    try:
        second.wait_for_line("listener ready", timeout=TAKEOVER_TIMEOUT)
        db.users.insert_one({"email": "while-stalled@example.com"})
        wait_for(
            lambda: len(emails(queue).get("while-stalled@example.com", ())) == PER_USER, "the new leader"
        )
    finally:
        os.kill(first.popen.pid, signal.SIGCONT)
    first.wait_for_line("lease lost on stream cli-test")
    wait_for(lambda: first.output.count("listener standby") == 1, "the former leader back in standby")
    assert "going back to standby" in first.output

    db.users.insert_one({"email": "after-wakeup@example.com"})
    wait_for(lambda: len(emails(queue).get("after-wakeup@example.com", ())) == PER_USER, "the new leader")
    time.sleep(1.0)
    assert len(queue.messages()) == 2 * PER_USER  # the former leader published nothing after waking up
    record = CheckpointStore(db).load_record(STREAM)
    assert record is not None and record.epoch == 2
    for process in (first, second):
        process.popen.terminate()
        assert process.finish() == EXIT_OK
