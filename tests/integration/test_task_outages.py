"""The dedup guard against refusing dependencies, with real `celery -A ... worker` processes.

- the dedup store's Redis answers OOM (maxmemory, noeviction), READONLY (a replica) or BUSY: every task
  is retried with backoff and ends done once Redis takes writes again, no dead letter;
- MongoDB refuses the dead letter (failCommand, Unauthorized): the message is handed back with
  backoff, not acked and forgotten; the dead letter appears once MongoDB takes it;
- the effect happened but its done record is refused: only the record is retried, no second email;
- the retry budget is a span of time (TASK_RETRY_FOR_SECONDS) carried across retries.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from bson import ObjectId
from celery.exceptions import Retry, TimeLimitExceeded
from pymongo.database import Database

from changeflow.worker.dead_letters import COLLECTION
from changeflow.worker.dedup import DedupStore
from changeflow.worker.errors import is_transient
from changeflow.worker.idempotent import EFFECT_DONE_HEADER, FIRST_ATTEMPT_HEADER
from changeflow.worker.keys import dedup_key
from changeflow.worker.testing import configured
from harness.pipeline import wait_until
from harness.ports import free_port
from harness.processes import ManagedProcess, worker_process
from harness.redis_server import RedisServer
from harness.smtp_sink import SmtpSink
from tests.faults.knobs import DELAY_ENV, FAULT_WORKER, FLAG_ENV, WINDOW_LOG
from worker import app

from .test_tasks import user_insert

WELCOME, PROFILE = "tasks.send_welcome_email", "tasks.create_profile"
OOM_SERVER = ("--maxmemory", "8mb", "--maxmemory-policy", "noeviction")


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def dedup_redis() -> Iterator[RedisServer]:
    """The dedup store's own Redis (REDIS_URL), apart from the broker, with maxmemory and noeviction."""
    with RedisServer(options=OOM_SERVER) as server:
        yield server


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    started: list[ManagedProcess] = []

    def start(env: dict[str, str], app_module: str = "worker") -> ManagedProcess:
        process = worker_process(env, f"worker{len(started) + 1}", app=app_module, log_dir=tmp_path)
        started.append(process)
        return process.start(timeout=90)

    yield start
    for process in started:
        process.stop()


def worker_env(
    broker: RedisServer, mongodb_uri: str, db: Database, smtp_port: int, **more: str
) -> dict[str, str]:
    return {
        "CELERY_BROKER_URL": broker.url,
        "REDIS_URL": broker.url,
        "MONGODB_URI": mongodb_uri,
        "MONGODB_DB": db.name,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "RETRY_BACKOFF_MAX": "1",  # a compressed clock: retries within a second
        "TASK_MAX_RETRIES": "",  # no count cap: the time budget alone
        **more,
    }


def submit(env: dict[str, str], events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Publish each (task name, event) as the listener would (task id = dedup key); the keys."""
    keys = []
    with configured(**env):
        for name, event in events:
            key = dedup_key(event["_id"], name)
            app.send_task(name, args=[event], task_id=key)
            keys.append(key)
    return keys


def users(n: int, *, email: bool = True) -> list[dict[str, Any]]:
    return [
        {"_id": ObjectId(), "name": f"User {i}", **({"email": f"user{i}@example.test"} if email else {})}
        for i in range(n)
    ]


def retries_logged(worker: ManagedProcess, key: str) -> int:
    """How often the worker logged a retry of `key` (Celery: `Task name[id] retry: Retry in ...`)."""
    return len(re.findall(rf"\[{re.escape(key)}\] retry: ", worker.log_text()))


def fill_until_oom(client: redis.Redis) -> int:
    """Write filler keys until Redis refuses with OOM; how many it took.

    Then maxmemory is lowered a little below what is used: the refused write's query buffer is freed
    afterwards, and that headroom would let a small write (a lease) through now and then.
    """
    for i in range(10_000):
        try:
            client.set(f"fill:{i}", b"x" * 65536)
        except redis.exceptions.OutOfMemoryError:
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", used - 512 * 1024)
            return i
    raise AssertionError("redis-server never reached maxmemory")


def free_memory(client: redis.Redis) -> None:
    keys = list(client.scan_iter(match="fill:*"))
    client.delete(*keys)


def broker_backlog(broker: RedisServer) -> int:
    client = redis.Redis.from_url(broker.url)
    try:
        return int(client.llen("celery")) + int(client.hlen("unacked"))
    finally:
        client.close()


# -- item 3: dedup-store Redis replies that mean "not now" ------------------------------------------


def make_oom(client: redis.Redis, spare: RedisServer) -> Callable[[], None]:
    fill_until_oom(client)
    return lambda: free_memory(client)


def make_readonly(client: redis.Redis, spare: RedisServer) -> Callable[[], None]:
    client.replicaof("127.0.0.1", spare.port)  # a replica after a failover: writes answer READONLY
    return lambda: client.replicaof("NO", "ONE")  # promoted


def make_busy(client: redis.Redis, spare: RedisServer) -> Callable[[], None]:
    # A script that never ends: past busy-reply-threshold every other command is answered BUSY (a plain
    # ResponseError in redis-py: classified by the reply's code).
    client.config_set("busy-reply-threshold", 100)
    spinner = redis.Redis.from_url(f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0")

    def spin() -> None:
        with contextlib.suppress(redis.exceptions.ResponseError):  # "Script killed by user"
            spinner.eval("while true do end", 0)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    time.sleep(0.3)

    def recover() -> None:
        client.script_kill()
        thread.join(10)
        spinner.close()

    return recover


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (make_oom, redis.exceptions.OutOfMemoryError),
        (make_readonly, redis.exceptions.ReadOnlyError),
        (make_busy, redis.exceptions.ResponseError),
    ],
    ids=["OOM", "READONLY", "BUSY"],
)
def test_a_dedup_store_refusing_writes_delays_tasks_and_loses_none(
    fault: Callable[[redis.Redis, RedisServer], Callable[[], None]],
    error: type[redis.exceptions.ResponseError],
    redis_server: RedisServer,
    dedup_redis: RedisServer,
    mongodb_uri: str,
    db: Database,
    smtp: SmtpSink,
    start_worker: Callable[..., ManagedProcess],
) -> None:
    env = worker_env(redis_server, mongodb_uri, db, smtp.port, REDIS_URL=dedup_redis.url)
    client = redis.Redis.from_url(dedup_redis.url)
    with RedisServer() as spare:
        recover = fault(client, spare)
        store = DedupStore(client, done_ttl_seconds=60, lease_ttl_seconds=60)
        with pytest.raises(error) as refused:  # the fault is real
            store.claim("probe", "test")
        assert is_transient(refused.value)
        worker = start_worker(env)
        people = users(4)
        keys = submit(env, [(task, user_insert(u)) for u in people for task in (WELCOME, PROFILE)])

        # Each task meets the fault more than once and is retried each time.
        assert wait_until(lambda: all(retries_logged(worker, k) >= 2 for k in keys), 90), worker.log_text()
        assert type(refused.value).__name__ in worker.log_text()
        assert db[COLLECTION].count_documents({}) == 0
        assert smtp.messages == [] and db.profiles.count_documents({}) == 0

        recover()
        assert wait_until(lambda: all(store.is_done(k) for k in keys), 90), worker.log_text()[-4000:]
    assert len(smtp.wait_for(4)) == 4
    assert set(smtp.count_by_message_id().values()) == {1}
    assert db.profiles.count_documents({}) == 4
    assert db[COLLECTION].count_documents({}) == 0
    assert wait_until(lambda: broker_backlog(redis_server) == 0, 30)
    client.close()


def test_a_refused_done_record_is_retried_alone_and_the_email_is_not_sent_twice(
    redis_server: RedisServer,
    dedup_redis: RedisServer,
    mongodb_uri: str,
    db: Database,
    smtp: SmtpSink,
    start_worker: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    flag = tmp_path / "slow.flag"
    env = worker_env(
        redis_server, mongodb_uri, db, smtp.port,
        REDIS_URL=dedup_redis.url, **{FLAG_ENV: str(flag), DELAY_ENV: "3000"},
    )  # fmt: skip
    worker = start_worker(env, FAULT_WORKER)
    client = redis.Redis.from_url(dedup_redis.url)
    flag.touch()  # tasks pause between their effect and the done record
    [key] = submit(env, [(WELCOME, user_insert(users(1)[0]))])
    worker.wait_for_log(rf"{WINDOW_LOG} {WELCOME} {key}", timeout=60)
    fill_until_oom(client)  # the email was accepted; now the done record cannot be written
    flag.unlink()
    worker.wait_for_log(rf"{WELCOME} {key}: the effect happened, its done record failed", timeout=30)
    assert len(smtp.messages) == 1
    time.sleep(2)  # a few handed-back deliveries meet the OOM (claim) and wait again

    free_memory(client)
    store = DedupStore(client, done_ttl_seconds=60, lease_ttl_seconds=60)
    assert wait_until(lambda: store.is_done(key), 60), worker.log_text()[-4000:]
    assert store.outcome(key) == "ok"
    assert f"done record stored {WELCOME} {key}" in worker.log_text()
    time.sleep(1)
    assert smtp.count_by_message_id() == {f"<{key}@changeflow>": 1}  # not sent again
    assert db[COLLECTION].count_documents({}) == 0
    client.close()


# -- item 2: MongoDB refuses the dead letter -------------------------------------------------------


def fail_dead_letter_writes(db: Database, mode: Any) -> int:
    """failCommand on the dead-letter upserts with Unauthorized (13); returns how often it fired."""
    command = {
        "configureFailPoint": "failCommand",
        "mode": mode,
        "data": {"failCommands": ["update"], "errorCode": 13, "namespace": f"{db.name}.{COLLECTION}"},
    }
    return int(db.client.admin.command(command).get("count", 0))


def test_a_dead_letter_mongodb_refuses_is_handed_back_not_lost(
    redis_server: RedisServer,
    mongodb_uri: str,
    db: Database,
    smtp: SmtpSink,
    start_worker: Callable[..., ManagedProcess],
) -> None:
    env = worker_env(redis_server, mongodb_uri, db, smtp.port, RETRY_BACKOFF_MAX="2")
    worker = start_worker(env)
    fail_dead_letter_writes(db, "alwaysOn")
    try:
        [key] = submit(env, [(WELCOME, user_insert(users(1, email=False)[0]))])  # permanent: no email
        refused = f"could not record the dead letter of {WELCOME} {key}"
        assert wait_until(lambda: worker.log_text().count(refused) >= 3, 60), worker.log_text()[-4000:]
        assert "OperationFailure" in worker.log_text()
        assert db[COLLECTION].count_documents({}) == 0
        assert broker_backlog(redis_server) == 1  # the message is still there, waiting for its retry
        time.sleep(4)
    finally:
        fired = fail_dead_letter_writes(db, "off")
    # Backoff, not a hot loop: with RETRY_BACKOFF_MAX=2 a few attempts per second at most.
    assert 3 <= fired <= 20, fired

    assert wait_until(lambda: db[COLLECTION].count_documents({}) == 1, 60), worker.log_text()[-4000:]
    letter = db[COLLECTION].find_one({"_id": key})
    assert letter is not None
    assert (letter["reason"], letter["task"]) == ("permanent", WELCOME)
    assert letter["attempts"] > fired  # every refused attempt ran the task once more
    assert "no valid email address" in letter["error"]
    assert wait_until(lambda: broker_backlog(redis_server) == 0, 30)  # acked once stored
    store = DedupStore(redis.Redis.from_url(redis_server.url), done_ttl_seconds=1, lease_ttl_seconds=1)
    assert not store.is_done(key)  # replayable
    store.client.close()


def test_a_hard_time_limit_kill_whose_dead_letter_is_refused_runs_again_later(
    redis_server: RedisServer, mongodb_uri: str, db: Database, smtp: SmtpSink
) -> None:
    # Celery calls on_failure in the worker's main process, then acks: the guard publishes a copy.
    env = worker_env(redis_server, mongodb_uri, db, smtp.port, RETRY_BACKOFF_MAX="7")
    event = user_insert(users(1)[0])
    key = dedup_key(event["_id"], WELCOME)
    with configured(**env):
        fail_dead_letter_writes(db, "alwaysOn")
        try:
            app.tasks[WELCOME].on_failure(TimeLimitExceeded(60), key, [event], {}, None)
        finally:
            fired = fail_dead_letter_writes(db, "off")
    assert fired == 1 and db[COLLECTION].count_documents({}) == 0
    broker = redis.Redis.from_url(redis_server.url)
    [raw] = broker.lrange("celery", 0, -1)
    broker.close()
    message = json.loads(raw)
    assert (message["headers"]["id"], message["headers"]["task"]) == (key, WELCOME)
    assert message["headers"]["eta"] is not None  # after RETRY_BACKOFF_MAX, not at once


# -- item 10: the retry budget is a span of time ---------------------------------------------------


def test_an_smtp_outage_longer_than_the_old_retry_count_ends_delivered(
    redis_server: RedisServer, mongodb_uri: str, db: Database, start_worker: Callable[..., ManagedProcess]
) -> None:
    port = free_port()  # nobody listens yet: connection refused, a transient error
    env = worker_env(redis_server, mongodb_uri, db, port, TASK_RETRY_FOR_SECONDS="600")
    worker = start_worker(env)
    keys = submit(env, [(WELCOME, user_insert(u)) for u in users(3)])
    # The old budget was TASK_MAX_RETRIES=8 retries; each task outlives it.
    outlived = wait_until(lambda: all(retries_logged(worker, k) >= 10 for k in keys), 120)
    assert outlived, worker.log_text()[-4000:]
    assert db[COLLECTION].count_documents({}) == 0
    with SmtpSink(port=port) as smtp:  # the SMTP server is back
        assert len(smtp.wait_for(3, timeout=60)) == 3
        assert wait_until(lambda: broker_backlog(redis_server) == 0, 30)
        assert set(smtp.count_by_message_id()) == {f"<{k}@changeflow>" for k in keys}
        assert set(smtp.count_by_message_id().values()) == {1}
    assert db[COLLECTION].count_documents({}) == 0


def test_the_budget_counts_from_the_first_attempt_across_retries(
    redis_server: RedisServer, mongodb_uri: str, db: Database, start_worker: Callable[..., ManagedProcess]
) -> None:
    # SMTP never comes back. If the first attempt's time did not travel with the retries, every
    # retry would start a new budget and the task would never end.
    env = worker_env(redis_server, mongodb_uri, db, free_port(), TASK_RETRY_FOR_SECONDS="4")
    worker = start_worker(env)
    started = time.monotonic()
    [key] = submit(env, [(WELCOME, user_insert(users(1)[0]))])
    assert wait_until(lambda: db[COLLECTION].count_documents({}) == 1, 60), worker.log_text()[-4000:]
    took = time.monotonic() - started
    letter = db[COLLECTION].find_one({"_id": key})
    assert letter is not None and letter["reason"] == "retries_exhausted"
    assert letter["attempts"] >= 3  # retried within the budget, with RETRY_BACKOFF_MAX=1
    assert "ConnectionRefusedError" in letter["error"]
    assert took >= 4
    assert wait_until(lambda: broker_backlog(redis_server) == 0, 30)


def test_a_delivery_whose_effect_happened_is_never_a_dead_letter(
    redis_server: RedisServer,
    mongodb_uri: str,
    db: Database,
    smtp: SmtpSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A retry that carries the effect-done header meets a dedup store that stays down past the budget:
    # the effect happened, so there is nothing to dead-letter and the body must not run again.
    env = worker_env(redis_server, mongodb_uri, db, smtp.port, TASK_MAX_RETRIES="2")
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # the dedup store: connection refused
    event = user_insert(users(1)[0])
    key = dedup_key(event["_id"], WELCOME)
    headers = {EFFECT_DONE_HEADER: "ok", FIRST_ATTEMPT_HEADER: time.time()}
    with configured(**env):
        result = app.tasks[WELCOME].apply(args=[event], task_id=key, headers=headers)
    assert result.state == "SUCCESS"
    assert smtp.messages == []  # the body did not run again
    assert db[COLLECTION].count_documents({}) == 0
    assert "its done record could not be stored within TASK_RETRY_FOR_SECONDS" in caplog.text


def test_a_lease_busy_copy_keeps_the_guards_headers(
    redis_server: RedisServer, mongodb_uri: str, db: Database, smtp: SmtpSink
) -> None:
    # A delivery that only has to record the done key (the effect happened) and meets a held lease is
    # re-published: the copy must still say so, or it would run the body (a second email).
    env = worker_env(redis_server, mongodb_uri, db, smtp.port)
    event = user_insert(users(1)[0])
    key = dedup_key(event["_id"], WELCOME)
    headers = {EFFECT_DONE_HEADER: "ok", FIRST_ATTEMPT_HEADER: 1234.5}
    task = app.tasks[WELCOME]
    with configured(**env):
        store = DedupStore(redis.Redis.from_url(redis_server.url), done_ttl_seconds=60, lease_ttl_seconds=60)
        store.claim(key, "another-delivery")
        task.push_request(
            id=key, args=[event], kwargs={}, retries=3, is_eager=False, called_directly=False,
            delivery_info={"exchange": "", "routing_key": "celery"}, headers=headers,
        )  # fmt: skip
        try:
            with pytest.raises(Retry):
                task(event)
        finally:
            task.pop_request()
        store.client.close()
    broker = redis.Redis.from_url(redis_server.url)
    [raw] = broker.lrange("celery", 0, -1)
    broker.close()
    sent = json.loads(raw)["headers"]
    assert (sent["id"], sent["retries"]) == (key, 3)
    assert (sent[EFFECT_DONE_HEADER], sent[FIRST_ATTEMPT_HEADER]) == ("ok", 1234.5)
    assert smtp.messages == []


def test_under_apply_a_refused_dead_letter_fails_the_task_instead_of_looping(
    redis_server: RedisServer, mongodb_uri: str, db: Database, smtp: SmtpSink
) -> None:
    # apply() has no message to lose: handing back would re-run the task in place for as long as
    # MongoDB refuses. The caller gets the failure instead.
    env = worker_env(redis_server, mongodb_uri, db, smtp.port)
    event = user_insert(users(1, email=False)[0])
    with configured(**env):
        fail_dead_letter_writes(db, "alwaysOn")
        try:
            result = app.tasks[WELCOME].apply(args=[event], task_id=dedup_key(event["_id"], WELCOME))
        finally:
            fired = fail_dead_letter_writes(db, "off")
    assert result.state == "FAILURE" and "no valid email address" in str(result.result)
    assert fired == 1
    assert db[COLLECTION].count_documents({}) == 0
