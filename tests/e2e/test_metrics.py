"""/metrics of a real listener and real workers (prefork, 2 pool processes each) while events flow.

The counters must equal the work done; the lag must be 0 while the stream is caught up and idle,
above 0 after a restart with a backlog, then 0 again; the oplog headroom must shrink while the
checkpoint stays put and the oplog rolls over.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pymongo
import pytest
from bson import ObjectId

from changeflow.listener.checkpoints import COLLECTION as CHECKPOINTS
from harness.metrics import Samples, has, scrape, value
from harness.pipeline import LocalPipeline, wait_until
from harness.ports import free_port
from harness.processes import ManagedProcess, python_module
from harness.workload import NOTIFIED_STATUSES, apply, plan

pytestmark = pytest.mark.e2e

WELCOME, PROFILE = "tasks.send_welcome_email", "tasks.create_profile"
ANALYTICS, SHIPPING = "tasks.update_analytics", "tasks.send_shipping_notification"


def _scraper(url: str) -> Callable[[], Samples]:
    def read() -> Samples:
        try:
            return scrape(url)
        except OSError:
            return {}

    return read


def _workers_sum(pipeline: LocalPipeline, name: str, **labels: str) -> float:
    return sum(value(scrape(pipeline.metrics_url(w.name)), name, **labels) for w in pipeline.workers)


def test_counters_equal_the_work_done() -> None:
    work = plan(users=12, orders=8)
    no_email = {"_id": ObjectId(), "name": "No Email"}
    users = len(work.users) + 1
    updates = len(work.transitions)
    notified = sum(1 for _, status in work.transitions if status in NOTIFIED_STATUSES)
    with LocalPipeline(workers=2, worker_concurrency=2, metrics=True) as pipeline:
        db = pipeline.db
        db.users.insert_one(no_email)
        apply(db, work)
        expected_outcomes = {
            (WELCOME, "done"): len(work.users),
            (WELCOME, "dead_letter"): 1,
            (PROFILE, "done"): users,
            (ANALYTICS, "done"): len(work.orders) + updates,
            (SHIPPING, "done"): notified,
            (SHIPPING, "skip"): updates - notified,
        }

        def outcomes() -> dict[tuple[str, str], float]:
            return {
                key: _workers_sum(pipeline, "changeflow_task_outcomes_total", task=key[0], outcome=key[1])
                for key in expected_outcomes
            }

        def runs() -> dict[str, float]:
            return {
                task: _workers_sum(pipeline, "changeflow_task_duration_seconds_count", task=task)
                for task in (WELCOME, PROFILE, ANALYTICS, SHIPPING)
            }

        total = sum(expected_outcomes.values())
        # The run time is observed just after the outcome (task_postrun): wait for both.
        # A batched task's (update_analytics) outcomes count its events, its run time its messages.
        unbatched = (WELCOME, PROFILE, SHIPPING)
        settled = wait_until(
            lambda: (
                outcomes() == expected_outcomes
                and sum(runs()[task] for task in unbatched) >= total - expected_outcomes[(ANALYTICS, "done")]
            ),
            timeout=90,
        )
        assert settled, f"{outcomes()} {runs()}\n{pipeline.logs()}"
        listener = scrape(pipeline.metrics_url("listener"))
        duplicates = _workers_sum(pipeline, "changeflow_task_outcomes_total", outcome="duplicate")
        dead_letters = _workers_sum(
            pipeline, "changeflow_task_dead_letters_total", task=WELCOME, reason="permanent"
        )
        run_counts = runs()
        every_outcome = {
            task: _workers_sum(pipeline, "changeflow_task_outcomes_total", task=task)
            for task in (WELCOME, PROFILE, ANALYTICS, SHIPPING)
        }
        # The card's four tasks (the app's other tasks of the same events may still be running).
        per_worker = [
            sum(card_outcomes(scrape(pipeline.metrics_url(w.name)), (WELCOME, PROFILE, ANALYTICS, SHIPPING)))
            for w in pipeline.workers
        ]

    def events(collection: str, operation: str) -> float:
        return value(listener, "changeflow_listener_events_total", collection=collection, operation=operation)

    assert events("users", "insert") == users
    assert events("orders", "insert") == len(work.orders)
    assert events("orders", "update") == updates
    published = {
        task: value(listener, "changeflow_listener_tasks_published_total", task=task)
        for task in (WELCOME, PROFILE, ANALYTICS, SHIPPING)
    }
    assert published == {
        WELCOME: users, PROFILE: users, ANALYTICS: len(work.orders) + updates, SHIPPING: updates
    }  # fmt: skip
    assert value(listener, "changeflow_listener_publish_seconds_count") >= 1
    assert value(listener, "changeflow_listener_batch_events_sum") == users + len(work.orders) + updates
    assert value(listener, "changeflow_listener_active") == 1
    assert value(listener, "changeflow_listener_gaps_open") == 0
    assert duplicates == 0
    assert dead_letters == 1
    # Each delivery ran once and ended once: the run-time histogram counts what the outcomes count.
    assert {t: run_counts[t] for t in unbatched} == {t: every_outcome[t] for t in unbatched}
    assert 1 <= run_counts[ANALYTICS] <= every_outcome[ANALYTICS]  # a message per batch of events
    assert every_outcome == published
    # Both workers served a share, each summing its own pool processes.
    assert all(count > 0 for count in per_worker) and sum(per_worker) == sum(published.values())


def card_outcomes(samples: Samples, tasks: tuple[str, ...]) -> list[float]:
    """Every outcome of each of `tasks` in one scrape (the app's other tasks left out)."""
    return [value(samples, "changeflow_task_outcomes_total", task=task) for task in tasks]


def _oplog_oldest_wall(client: pymongo.MongoClient) -> datetime:
    entry = client.local["oplog.rs"].find().sort("$natural", 1).limit(1).next()
    return entry["wall"].replace(tzinfo=UTC)


def _oplog_entries(client: pymongo.MongoClient) -> int:
    return len(list(client.local["oplog.rs"].find({}, {"ts": 1})))


def _fill(db: pymongo.database.Database, count: int) -> None:
    """Writes no route watches: oplog entries that make no event for the listener."""
    for i in range(count):
        db.filler.insert_one({"i": i})
        time.sleep(0.005)


OPLOG_SIZE = 400


def test_lag_and_oplog_headroom_follow_the_stream() -> None:
    # A getMore waits 3 s for events: the lag stays above 0 that long after a backlog is read.
    # The first listener saves an idle checkpoint only after 60 s, so its checkpoint stays put.
    env = {"LISTENER_MAX_AWAIT_MS": "3000"}
    pipeline = LocalPipeline(workers=1, metrics=True, oplog_size=OPLOG_SIZE, extra_env=env)
    pipeline.start(listener=False)
    try:
        listener = pipeline.start_listener("--idle-checkpoint-interval", "60")
        assert pipeline.client is not None
        client, db = pipeline.client, pipeline.db
        read = _scraper(pipeline.metrics_url("listener"))
        users = plan(users=40, orders=0)
        for user in users.users:
            db.users.insert_one(dict(user))
            time.sleep(0.01)
        last_write = client.local["oplog.rs"].find({"ns": f"{db.name}.users"}).sort("$natural", -1).limit(1)
        last_wall = last_write.next()["wall"].replace(tzinfo=UTC)

        def checkpoint_time() -> datetime | None:
            doc = db[CHECKPOINTS].find_one({"_id": "changeflow"}) or {}
            when = doc.get("position_time")
            return when.replace(tzinfo=UTC) if when is not None else None

        # Caught up and idle: every event counted, the checkpoint at the last one, the lag 0.
        assert wait_until(lambda: (checkpoint_time() or datetime.min.replace(tzinfo=UTC)) >= last_wall, 30)
        assert wait_until(lambda: value(read(), "changeflow_listener_lag_seconds") == 0 and has(
            read(), "changeflow_listener_lag_seconds"), 15), pipeline.logs()  # fmt: skip
        assert value(read(), "changeflow_listener_events_total", collection="users") == 40
        checkpoint = checkpoint_time()
        assert checkpoint is not None

        # Roll the oplog over (writes no route watches) while the checkpoint stays put.
        _fill(db, OPLOG_SIZE - _oplog_entries(client) + 5)
        # The listener reads the oplog window at most once a second; its lease renewals keep rolling
        # the oplog, so the oldest entry it saw is bracketed by a read before and after its scrape.
        time.sleep(1.1)
        oldest_first = _oplog_oldest_wall(client)
        first = read()
        oldest_first_after = _oplog_oldest_wall(client)
        _fill(db, 20)
        time.sleep(1.1)
        oldest_second = _oplog_oldest_wall(client)
        second = read()
        oldest_second_after = _oplog_oldest_wall(client)
        assert checkpoint_time() == checkpoint
        headroom = [value(s, "changeflow_listener_oplog_headroom_seconds") for s in (first, second)]
        assert oldest_second > oldest_first_after
        assert headroom[1] < headroom[0]

        def within(headroom: float, oldest: datetime, oldest_after: datetime) -> bool:
            # position_time is stored to the millisecond, the listener keeps microseconds
            slack = 0.001
            low, high = (checkpoint - oldest_after).total_seconds(), (checkpoint - oldest).total_seconds()
            return low - slack <= headroom <= high + slack

        assert within(headroom[0], oldest_first, oldest_first_after), (headroom, checkpoint, oldest_first)
        assert within(headroom[1], oldest_second, oldest_second_after), (headroom, checkpoint, oldest_second)
        age = [value(s, "changeflow_listener_checkpoint_age_seconds") for s in (first, second)]
        assert age[1] > age[0] > 0
        # Unwatched writes leave a caught-up stream caught up.
        assert [value(s, "changeflow_listener_lag_seconds") for s in (first, second)] == [0, 0]

        # Stopped, writes happen, restarted: behind first (lag > 0), then caught up (0).
        listener.stop()
        backlog = plan(users=5, orders=0, prefix="late")
        apply(db, backlog)
        time.sleep(0.5)
        pipeline.start_listener()
        lags: list[float] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            samples = read()
            if has(samples, "changeflow_listener_lag_seconds"):
                lags.append(value(samples, "changeflow_listener_lag_seconds"))
                if lags[-1] == 0 and any(lag > 0 for lag in lags):
                    break
            time.sleep(0.05)
        after = read()
        logs = pipeline.logs()

    finally:
        pipeline.stop()

    assert lags and lags[0] >= 0.5, (lags, logs)  # the backlog is at least that old
    first_zero = lags.index(0)
    assert all(lag > 0 for lag in lags[:first_zero]), lags
    assert value(after, "changeflow_listener_lag_seconds") == 0
    assert value(after, "changeflow_listener_events_total", collection="users", operation="insert") == 5
    assert value(after, "changeflow_listener_tasks_published_total", task=WELCOME) == 5


def _worker(pipeline: LocalPipeline, name: str, *options: str) -> ManagedProcess:
    port = free_port()
    pipeline.metrics_ports[name] = port
    args = [
        "-A", "worker", "worker", "--loglevel", "INFO", "--hostname", f"{name}@%h",
        "--without-mingle", "--without-gossip", *options,
    ]  # fmt: skip
    env = {**pipeline.env, "WORKER_METRICS_PORT": str(port)}
    process = python_module(name, "celery", *args, env=env, ready=r"ready\.", log_dir=pipeline.log_dir)
    pipeline.workers.append(process)
    return process.start(timeout=60)


def test_threads_pool_and_replaced_pool_processes_count_every_delivery() -> None:
    """A prefork worker whose pool processes exit after 2 tasks each (the counts of processes that
    are gone stay in its sums), then a threads-pool worker."""
    first, second = plan(users=10, orders=0), plan(users=5, orders=0, prefix="second")
    with LocalPipeline(workers=0, metrics=True) as pipeline:

        def done(name: str, task: str) -> float:
            samples = scrape(pipeline.metrics_url(name))
            return value(samples, "changeflow_task_outcomes_total", task=task, outcome="done")

        def all_done(name: str, count: int) -> bool:
            return done(name, WELCOME) == count and done(name, PROFILE) == count

        prefork = _worker(pipeline, "prefork", "--concurrency", "2", "--max-tasks-per-child", "2")
        apply(pipeline.db, first)
        assert wait_until(lambda: all_done("prefork", 10), timeout=90), pipeline.logs()
        prefork_total = sum(card_outcomes(scrape(pipeline.metrics_url("prefork")), (WELCOME, PROFILE)))
        prefork_log = prefork.log_text()
        prefork.stop()
        _worker(pipeline, "threads", "-P", "threads", "--concurrency", "2")
        apply(pipeline.db, second)
        assert wait_until(lambda: all_done("threads", 5), timeout=90), pipeline.logs()
        threads_total = sum(card_outcomes(scrape(pipeline.metrics_url("threads")), (WELCOME, PROFILE)))

    assert (prefork_total, threads_total) == (20, 10)
    # 20 tasks, 2 per pool process: the processes that ran them were replaced, and their counts stayed.
    assert len(set(re.findall(r"ForkPoolWorker-(\d+)\]", prefork_log))) > 2, prefork_log[-3000:]
