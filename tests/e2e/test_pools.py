"""The pipeline with its worker under `celery worker -P threads` and `-P gevent` (issue 12): real processes
as in test_pipeline.py (redis-server, MongoDB test server, SMTP sink, listener, one worker), its tasks
run by many threads / greenlets of one process at once.

Each pool must keep what prefork keeps: every effect once, redelivered duplicates (same task id, also
several at the same instant while the first still runs) absorbed by the guard, a transient SMTP
failure retried, a permanent one dead-lettered with its reason, an ordered route's order, and traces
(set up in the worker process itself: no pool process is forked).
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from bson import ObjectId
from celery import Celery

from changeflow.worker.app import celery_config
from changeflow.worker.serialization import register_bson_types
from changeflow.worker.settings import Settings
from harness.effects import compare, observe
from harness.pipeline import LocalPipeline, wait_until
from harness.workload import apply, plan
from tests.e2e.test_traces import Receiver

pytestmark = pytest.mark.e2e

# (pool, concurrency): more slots than the test's tasks need at once, as these pools are run.
POOLS = [("threads", 16), ("gevent", 50)]
WELCOME = "tasks.send_welcome_email"
_ORDER_SUBJECT = re.compile(r"Your order (\S+) (has shipped|has been delivered)")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def _publisher(pipeline: LocalPipeline) -> Celery:
    register_bson_types()  # the event's ObjectIds, as the listener sends them
    app = Celery("test-pools", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=pipeline.redis_env["CELERY_BROKER_URL"])))
    return app


def _insert_event(user: dict[str, Any]) -> dict[str, Any]:
    """A users insert as the listener hands it to the welcome task (the guard looks at the id first)."""
    return {
        "_id": {"_data": f"82{ObjectId()}"},
        "operationType": "insert",
        "ns": {"db": "changeflow", "coll": "users"},
        "documentKey": {"_id": user["_id"]},
        "fullDocument": user,
    }


def _pipeline(pool: str, concurrency: int, env: dict[str, str]) -> LocalPipeline:
    return LocalPipeline(workers=1, worker_concurrency=concurrency, worker_pool=pool, extra_env=env)


@pytest.mark.parametrize(("pool", "concurrency"), POOLS, ids=[p for p, _ in POOLS])
def test_effects_once_duplicates_retries_dead_letters_and_order_under_the_pool(
    pool: str, concurrency: int
) -> None:
    work = plan(users=40, orders=40)  # orders 2, 3 mod 4 ship (and deliver): the ordered route
    no_email = {"_id": ObjectId(), "name": "No Email"}
    env = {"RETRY_BACKOFF_MAX": "2"}  # the transient failure's retry comes within 2 s
    with LocalPipeline(
        workers=1, worker_concurrency=concurrency, worker_pool=pool, extra_env=env
    ) as pipeline:
        assert pipeline.sink is not None
        sink, db = pipeline.sink, pipeline.db
        sink.fail_next(3)  # the first three mails: 451, transient
        db.users.insert_one(dict(no_email))
        apply(db, work)

        def settled() -> bool:
            effects = observe(db, sink)
            return compare(work, effects).lost == 0 and len(effects.dead_letters) >= 1

        assert wait_until(settled, timeout=120), pipeline.logs()
        first = observe(db, sink)
        welcome_keys = {
            str(m["Message-ID"]).strip("<>").split("@")[0]: m
            for m in sink.messages
            if "Welcome" in m["Subject"]
        }

        # Redelivered duplicates: the same task ids again, ten of them twice each, all at once.
        app = _publisher(pipeline)
        users = {u["email"]: u for u in work.users}
        again = list(welcome_keys.items())[:10]
        for key, message in again * 2:
            user = users[message["To"].addresses[0].addr_spec]
            app.send_task(WELCOME, args=[_insert_event(user)], task_id=key)
        # A new key delivered three times at the same instant while the first run is still in SMTP:
        # one delivery takes the lease, the others wait for it and then find the key done.
        sink.delay_seconds = 1.0
        racer = {"_id": ObjectId(), "email": "racer@example.test", "name": "Racer"}
        racer_event, racer_key = _insert_event(racer), str(ObjectId())
        for _ in range(3):
            app.send_task(WELCOME, args=[racer_event], task_id=racer_key)
        worker = pipeline.workers[0]
        for key, _ in again:
            worker.wait_for_log(rf"duplicate {WELCOME} {key}", timeout=30)
        worker.wait_for_log(rf"duplicate {WELCOME} {racer_key}", timeout=60)
        time.sleep(1)  # a late extra copy would show up now
        sink.delay_seconds = 0
        app.close()
        effects = observe(db, sink)
        messages = sink.messages
        log = worker.log_text()
        dead_letters = effects.dead_letters

    assert re.search(rf"-P {pool}: TASK_SOFT_TIME_LIMIT \(30s\)[^\n]* not enforced", log), log[:3000]
    # Every effect of the workload once (emails, profiles, analytics), nothing doubled.
    assert effects.welcome == work.expected_welcome_recipients() + Counter({"racer@example.test": 1})
    assert effects.shipping == work.expected_shipping_recipients()
    assert effects.doubled_emails == 0, effects.message_ids.most_common(3)
    # A profile per user (the one without an email too: only its mail fails), each status counted once.
    assert effects.profiles == Counter({u["_id"]: 1 for u in [*work.users, no_email]})
    assert effects.status_counts == work.expected_status_counts()
    assert first.emails + 1 == effects.emails  # the duplicates sent nothing, the racer one mail
    # Each redelivered duplicate was absorbed: logged once per copy.
    for key, _ in again:
        assert log.count(f"duplicate {WELCOME} {key}") == 2, key
    assert log.count(f"lease busy {WELCOME} {racer_key}") >= 1  # the racers found the lease held
    # The transient failures were retried (and then delivered: every welcome mail arrived above).
    assert len(re.findall(r"retry: Retry in .*SMTP 451", log)) >= 3, log[-3000:]
    # The permanent failure: one dead letter, with its reason and cause.
    [letter] = dead_letters
    assert (letter["task"], letter["reason"]) == (WELCOME, "permanent")
    assert letter["payload"]["documentKey"]["_id"] == no_email["_id"]
    assert "no valid email address" in letter["error"]
    # The ordered route: each order's "shipped" mail arrived before its "delivered" one.
    seen: dict[str, list[str]] = defaultdict(list)
    for message in messages:
        found = _ORDER_SUBJECT.fullmatch(str(message["Subject"]))
        if found:
            seen[found.group(1)].append(found.group(2))
    delivered = [order for order, statuses in seen.items() if "has been delivered" in statuses]
    assert len(delivered) == 10
    for order in delivered:
        assert seen[order] == ["has shipped", "has been delivered"], (order, seen[order])


@pytest.mark.parametrize(("pool", "concurrency"), POOLS, ids=[p for p, _ in POOLS])
def test_traces_under_the_pool(receiver: Receiver, pool: str, concurrency: int) -> None:
    """worker_process_init is not sent by these pools: tracing is set up in the worker itself."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with LocalPipeline(
        workers=1, worker_concurrency=concurrency, worker_pool=pool, extra_env=env
    ) as pipeline:
        assert pipeline.sink is not None
        pipeline.db.users.insert_one({"name": "Ada", "email": "ada@example.com"})
        pipeline.sink.wait_for(1, timeout=30)

        def names() -> set[str]:
            return {span.name for service, span in list(receiver.spans) if service == "changeflow-worker"}  # type: ignore[attr-defined]

        assert wait_until(lambda: {f"run/{WELCOME}", "smtp.send"} <= names(), timeout=20), (
            sorted(names()),
            pipeline.logs(),
        )


@pytest.mark.parametrize(("pool", "concurrency"), POOLS, ids=[p for p, _ in POOLS])
def test_time_limits_hold_as_documented_for_the_pool(pool: str, concurrency: int) -> None:
    """gevent enforces the hard limit (at the task's next I/O wait): the guard lets its lease go and
    the task is a dead letter, as under prefork. threads enforces none: the slow mail goes out."""
    env = {"TASK_SOFT_TIME_LIMIT": "1", "TASK_TIME_LIMIT": "2"}
    with _pipeline(pool, concurrency, env) as pipeline:
        assert pipeline.sink is not None
        pipeline.sink.delay_seconds = 4.0  # the SMTP reply comes after the hard limit
        user_id = pipeline.db.users.insert_one({"name": "Slow", "email": "slow@example.test"}).inserted_id
        letters = pipeline.db.changeflow_dead_letters
        if pool == "gevent":
            assert wait_until(lambda: letters.count_documents({}) == 1, timeout=60), pipeline.logs()
            letter = letters.find_one()
            assert letter is not None
            redis_client = pipeline.redis_client()
            lease_left = redis_client.exists(f"changeflow:lease:{letter['task_id']}")
            done = redis_client.exists(f"changeflow:done:{letter['task_id']}")
            redis_client.close()
        else:
            pipeline.sink.wait_for(1, timeout=60)
        time.sleep(3)  # whatever else would happen (a second letter, a retry) shows up now
        log = pipeline.workers[0].log_text()
        all_letters = list(letters.find())
        profiles = pipeline.db.profiles.count_documents({"_id": user_id})

    assert profiles == 1  # the user's other effect is untouched
    if pool == "gevent":
        [letter] = all_letters
        assert (letter["task"], letter["reason"]) == (WELCOME, "permanent")
        assert "TimeLimitExceeded: hard time limit (2" in letter["error"]
        assert (lease_left, done) == (0, 0)  # released by the guard, not done: a replay sends it
        assert "Hard time limit (2" in log
    else:
        assert all_letters == []
        assert "Hard time limit" not in log and "SoftTimeLimitExceeded" not in log
