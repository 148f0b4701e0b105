"""Backpressure with real processes: `python -m listener`, a real redis-server, no worker.

The queue stops growing at LISTENER_MAX_QUEUE_LENGTH (plus at most one batch); drained, the listener
goes on; in the end every task is there once, nothing dropped.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import redis
from celery import Celery
from pymongo.database import Database

from changeflow.listener.backpressure import BrokerQueueLength
from changeflow.listener.exit_codes import EXIT_OK
from changeflow.listener.health import check
from harness.redis_server import RedisServer
from tests.card import user_insert_tasks
from tests.integration.test_listener import celery_app, decode, wait_for  # noqa: F401 (fixture)
from tests.integration.test_listener_cli import Process, env, processes  # noqa: F401 (fixtures)

LIMIT = 20
BATCH = 5  # events per batch
USER_TASKS = user_insert_tasks()  # the tasks of one user insert
USERS = 60


def test_priority_lists_count_towards_the_queue_length(celery_app: Celery, redis_server: RedisServer) -> None:  # noqa: F811
    # kombu's Redis transport keeps a message of priority > 0 in a list of its own ("celery\x06\x163"...).
    length = BrokerQueueLength(celery_app)
    assert length() == 0
    for priority in (0, 0, 5, 9):
        celery_app.send_task("tasks.create_profile", args=[{}], priority=priority)
    client = redis.Redis.from_url(redis_server.url)
    lists = sorted(key for key in client.keys("celery*") if client.type(key) == b"list")
    assert len(lists) == 3  # the priorities landed in different lists
    assert client.llen("celery") == 2
    assert length() == 4
    length.close()


def test_the_listener_stops_reading_at_the_bound_and_goes_on_when_the_queue_drains(
    env: dict[str, str],  # noqa: F811
    db: Database,
    redis_server: RedisServer,
    processes: list[Process],  # noqa: F811
    tmp_path: Path,
) -> None:
    health_file = tmp_path / "health.json"
    process = Process(
        {**env, "LISTENER_MAX_QUEUE_LENGTH": str(LIMIT), "LISTENER_BATCH_SIZE": str(BATCH)},
        "--health-file", str(health_file),
    )  # fmt: skip
    processes.append(process)
    process.wait_for_line("listener ready")
    users = [{"email": f"bp{i}@example.test", "n": i} for i in range(USERS)]
    db.users.insert_many(users)
    client = redis.Redis.from_url(redis_server.url)
    most = LIMIT + len(USER_TASKS) * BATCH  # the bound plus one batch of messages
    process.wait_for_line("pausing the change stream")
    queued = client.llen("celery")
    assert LIMIT <= queued <= most
    time.sleep(1.5)  # paused: nothing more arrives
    assert client.llen("celery") == queued
    healthy, reason = check(health_file, max_stall=30, ready=True)
    assert healthy and "paused" in reason, reason
    assert json.loads(health_file.read_text())["paused"]["limit"] == LIMIT

    # Drain as a slow worker would (BRPOP takes the oldest): the listener goes on, pauses, goes on...
    taken: list[dict[str, object]] = []
    highest = queued
    deadline = time.monotonic() + 60
    while len(taken) < len(USER_TASKS) * USERS and time.monotonic() < deadline:
        highest = max(highest, client.llen("celery"))
        raw = client.rpop("celery")
        if raw is None:
            time.sleep(0.02)
            continue
        taken.append(decode(raw))
        time.sleep(0.005)
    assert highest <= most, f"the queue reached {highest} messages, bound {LIMIT} + one batch {most - LIMIT}"
    got = sorted((str(m["task"]), m["payload"]["documentKey"]["_id"]) for m in taken)  # type: ignore[index]
    want = sorted((task, user["_id"]) for user in users for task in USER_TASKS)
    assert got == want  # every task once: nothing dropped, nothing doubled
    # One line each time it pauses and goes on (the last pause may still be on).
    pauses, resumes = (process.output.count(f"{what} the change stream") for what in ("pausing", "resuming"))
    assert resumes >= 1 and pauses - resumes in (0, 1), process.output

    process.popen.send_signal(signal.SIGTERM)
    assert process.finish() == EXIT_OK
    client.close()
