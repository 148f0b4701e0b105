"""The catalogue's tasks against real servers: the MongoDB test server (or MONGODB_URI) and private
redis-servers (the dedup store, and a second one as the application's cache). Tasks run in-process
through `apply()` with the listener's task id; the DB effects are also checked without the guard,
as a redelivery after a lost done record would run them."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from bson import ObjectId, Timestamp
from pymongo.database import Database

from changeflow.worker.keys import dedup_key
from changeflow.worker.settings import Settings
from changeflow.worker.testing import configured
from harness.redis_server import RedisServer
from tasks.cache import invalidate_user_cache
from tasks.event_log import log_once, log_registration, registration_entry
from tasks.event_store import HISTORY_ORDER, append_event, append_once, store_entry

WALL = dt.datetime(2026, 11, 23, 19, 38, 14, 123000)


def change(
    coll: str, operation: str, key: Any, clusterTime: Timestamp | None = None, **fields: Any
) -> dict[str, Any]:
    return {
        "_id": {"_data": uuid.uuid4().hex.upper()},
        "operationType": operation,
        "ns": {"db": "shop", "coll": coll},
        "documentKey": {"_id": key},
        "clusterTime": clusterTime or Timestamp(1_763_926_694, 1),
        "wallTime": WALL,
        **fields,
    }


def run(task: Any, event: dict[str, Any]) -> Any:
    return task.apply(args=[event], task_id=dedup_key(event["_id"], task.name))


@pytest.fixture
def cache_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def worker(
    redis_server: RedisServer, cache_server: RedisServer, mongodb_uri: str, db: Database
) -> Iterator[Settings]:
    env = {
        "CELERY_BROKER_URL": redis_server.url,
        "REDIS_URL": redis_server.url,
        "CACHE_REDIS_URL": cache_server.url,
        "MONGODB_URI": mongodb_uri,
        "MONGODB_DB": db.name,
        "TASK_MAX_RETRIES": "2",
    }
    with configured(**env) as settings:
        yield settings


def test_a_registration_is_logged_once_however_often_it_runs(worker: Settings, db: Database) -> None:
    oid = ObjectId()
    event = change("users", "insert", oid, fullDocument={"_id": oid, "email": "ada@example.test"})
    assert run(log_registration, event).state == "SUCCESS"
    # Without the guard (a redelivery whose done record was lost), from 8 threads at once.
    entry = registration_entry(event)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(log_once(db, entry))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [False] * 8
    [logged] = db.event_log.find({"user_id": oid})
    assert logged["metadata"] == {"email": "ada@example.test"} and logged["type"] == "user_registered"
    assert logged["created_at"] == WALL


def test_a_change_is_stored_once_and_an_aggregate_reads_in_commit_order(
    worker: Settings, db: Database
) -> None:
    oid = ObjectId()
    # One transaction: two changes of one clusterTime, told apart by their tokens (stream order).
    same = Timestamp(1_763_926_700, 3)
    events = [
        change(
            "orders", "insert", oid, Timestamp(1_763_926_699, 1), fullDocument={"_id": oid, "status": "new"}
        ),
        change("orders", "update", oid, same, updateDescription={"updatedFields": {"status": "paid"}}),
        change("orders", "delete", oid, same),
    ]
    events[1]["_id"] = {"_data": "82691F0A2C000000032B0429296E1404"}
    events[2]["_id"] = {"_data": "82691F0A2C000000032B0429296E1405"}
    for event in reversed(events):
        assert run(append_event, event).state == "SUCCESS"
        assert append_once(db, store_entry(event)) is False  # a redelivery without the guard: no second entry
    history = list(db.event_store.find({"aggregateId": oid}).sort(HISTORY_ORDER))
    assert [e["eventType"] for e in history] == ["insert", "update", "delete"]
    assert [e["eventId"] for e in history] == [e["_id"]["_data"] for e in events]
    assert isinstance(history[0]["aggregateId"], ObjectId) and isinstance(history[1]["timestamp"], Timestamp)
    names = {tuple(index["key"]) for index in db.event_store.list_indexes()}
    assert (("aggregateId", 1), ("timestamp", 1), ("eventId", 1)) in {
        tuple((k, int(v)) for k, v in index["key"].items()) for index in db.event_store.list_indexes()
    }, names


def test_a_user_change_deletes_its_cache_keys_and_leaves_the_others(
    worker: Settings, cache_server: RedisServer, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    oid = ObjectId()
    cache = redis.Redis.from_url(cache_server.url)
    stale = [
        f"user:{oid}",
        f"user_profile:{oid}",
        "user_by_email:old@example.test",
        "user_by_email:new@example.test",
    ]
    unrelated = [f"user:{ObjectId()}", "user_by_email:someone@example.test", "session:1"]
    cache.mset({key: "cached" for key in stale + unrelated})
    event = change(
        "users",
        "update",
        oid,
        updateDescription={"updatedFields": {"email": "new@example.test"}, "removedFields": []},
        fullDocument={"_id": oid, "email": "new@example.test"},
        fullDocumentBeforeChange={"_id": oid, "email": "old@example.test"},
    )
    assert run(invalidate_user_cache, event).state == "SUCCESS"
    assert cache.exists(*stale) == 0
    assert cache.exists(*unrelated) == len(unrelated)
    # The dedup store is another server: the cache keys did not go there.
    assert redis.Redis.from_url(redis_server.url).exists(*unrelated) == 0

    # A change without its pre-image: the id keys and the new email go, with a warning.
    cache.mset({key: "cached" for key in stale})
    caplog.set_level(logging.WARNING, logger="tasks.cache")
    blind = {**change("users", "replace", oid, fullDocument={"_id": oid, "email": "new@example.test"}),
             "fullDocumentBeforeChange": None}  # fmt: skip
    assert run(invalidate_user_cache, blind).state == "SUCCESS"
    assert cache.exists(*stale) == 1 and cache.exists("user_by_email:old@example.test") == 1
    assert "could not be known" in caplog.text and str(oid) in caplog.text
    cache.close()
