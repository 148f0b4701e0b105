"""The listener against the MongoDB test server and a private redis-server.

Writes go through plain pymongo; the task messages are read back from the Redis list `celery` and
decoded as a Celery worker would. The listener runs in a thread, with a Celery app configured like
worker.app but on this test's redis-server.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pymongo
import pytest
import redis
from bson import ObjectId
from bson.code import Code
from bson.regex import Regex
from celery import Celery
from kombu.serialization import loads
from pymongo.database import Database

from changeflow.listener.backoff import Backoff
from changeflow.listener.checkpoints import CheckpointStore
from changeflow.listener.exit_codes import EXIT_HISTORY_LOST, EXIT_OK
from changeflow.listener.payload import PAYLOAD_FIELDS
from changeflow.listener.publish import CeleryPublisher
from changeflow.listener.routes import Route
from changeflow.listener.stream import Listener
from changeflow.worker.app import celery_config
from changeflow.worker.keys import dedup_key
from changeflow.worker.settings import Settings
from harness.redis_server import RedisServer
from tests.card import card_routes
from worker import app as repo_app

ROUTES = card_routes()  # this repository's app (tasks/): the card's routes

STREAM = "test-listener"
TIMEOUT = 15.0


def wait_for(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Queue:
    """The Redis list `celery`, decoded like a worker decodes it: (task name, task id, payload)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def messages(self) -> list[dict[str, Any]]:
        try:
            raw = self.client.lrange("celery", 0, -1)
        except redis.ConnectionError:
            return []
        return [decode(item) for item in reversed(raw)]  # LPUSH: the newest is first

    def wait(self, count: int) -> list[dict[str, Any]]:
        return wait_for(lambda: len(m := self.messages()) >= count and m, f"{count} task messages")  # type: ignore[return-value]


def decode(raw: bytes) -> dict[str, Any]:
    envelope = json.loads(raw)
    body = base64.b64decode(envelope["body"])
    args, kwargs, _embed = loads(body, envelope["content-type"], envelope["content-encoding"])
    headers = envelope["headers"]
    assert kwargs == {} and len(args) == 1
    return {"task": headers["task"], "id": headers["id"], "payload": args[0], "envelope": envelope}


@pytest.fixture
def celery_app(redis_server: RedisServer) -> Iterator[Celery]:
    """Configured like worker.app (same serializer, same message format) on this test's Redis."""
    app = Celery("changeflow-test", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=redis_server.url)))
    app.conf.broker_connection_timeout = 1  # a stopped redis-server fails fast
    yield app
    app.close()


@pytest.fixture
def queue(redis_server: RedisServer) -> Queue:
    return Queue(redis_server.url)


@pytest.fixture
def app_name() -> str:
    return f"listener-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def listener_db(mongodb_uri: str, db: Database, app_name: str) -> Iterator[Database]:
    """The test's database through a client of the listener's own, named so fail points can target it."""
    client: pymongo.MongoClient = pymongo.MongoClient(
        mongodb_uri, appname=app_name, serverSelectionTimeoutMS=10_000
    )
    yield client[db.name]
    client.close()


class Running:
    """A Listener in a thread: start() waits until it is ready; stop() returns its exit code."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.listener.run()

    def start(self) -> Running:
        self.thread.start()
        wait_for(lambda: self.listener.ready.is_set() or not self.thread.is_alive(), "listener ready")
        return self

    def stop(self) -> int | None:
        self.listener.stop()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "listener did not stop"
        return self.code


@pytest.fixture
def start_listener(listener_db: Database, celery_app: Celery) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(routes: Sequence[Route] = ROUTES, **settings: Any) -> Running:
        options = {
            "listener_stream_name": STREAM,
            "listener_max_await_ms": 100,
            "mongodb_db": listener_db.name,
        }
        listener = Listener(
            listener_db,
            CeleryPublisher(celery_app),
            routes=routes,
            settings=Settings(**{**options, **settings}),
            backoff=Backoff(base=0.05, cap=0.5),
            idle_checkpoint_seconds=0.2,
        )
        running.append(Running(listener).start())
        return running[-1]

    yield start
    for each in running:
        if each.thread.is_alive():
            each.stop()


def checkpoint(db: Database) -> dict[str, Any] | None:
    return CheckpointStore(db).load(STREAM)  # type: ignore[return-value]


def at_or_after(token: dict[str, Any] | None, event_id: dict[str, Any]) -> bool:
    """Resume tokens' _data hex strings compare in stream order."""
    return token is not None and token["_data"] >= event_id["_data"]


def ids(event_id: dict[str, Any], *tasks: str) -> list[str]:
    return [dedup_key(event_id, task) for task in tasks]


WELCOME_AND_PROFILE = ("tasks.send_welcome_email", "tasks.create_profile")


def test_a_route_asking_for_pre_images_gets_them_and_the_listener_enables_them(
    db: Database, queue: Queue, start_listener: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="changeflow.listener.pre_images")
    start_listener(routes=repo_app.routes)  # the whole app: tasks.invalidate_user_cache asks for them
    assert "pre-images enabled on" in caplog.text and f"{db.name}.users" in caplog.text
    [users] = db.list_collections(filter={"name": "users"})  # created with them: it did not exist
    assert users["options"].get("changeStreamPreAndPostImages") == {"enabled": True}
    user_id = db.users.insert_one({"email": "old@example.test"}).inserted_id
    db.users.update_one({"_id": user_id}, {"$set": {"email": "new@example.test"}})
    db.orders.insert_one({"_id": 1, "status": "new"})
    db.orders.update_one({"_id": 1}, {"$set": {"status": "paid"}})  # orders: no images enabled
    db.users.delete_one({"_id": user_id})
    # users insert 4 tasks, users update 2, orders insert 2, orders status change 3, users delete 2.
    messages = queue.wait(13)
    by = {(m["task"], m["payload"]["operationType"], m["payload"]["ns"]["coll"]): m["payload"]
          for m in messages}  # fmt: skip
    update = by[("tasks.invalidate_user_cache", "update", "users")]
    assert update["fullDocumentBeforeChange"] == {"_id": user_id, "email": "old@example.test"}
    assert by[("tasks.invalidate_user_cache", "delete", "users")]["fullDocumentBeforeChange"]["email"] == (
        "new@example.test"
    )
    assert by[("tasks.append_event", "update", "orders")]["fullDocumentBeforeChange"] is None
    assert "fullDocumentBeforeChange" not in by[("tasks.append_event", "insert", "users")]


def test_routed_writes_become_celery_task_messages(
    db: Database, queue: Queue, start_listener: Callable[..., Running]
) -> None:
    running = start_listener()
    user_id = db.users.insert_one({"email": "ada@example.com", "name": "Ada"}).inserted_id
    db.orders.insert_one({"_id": 1, "user_id": user_id, "status": "new", "total": 10})
    db.orders.update_one({"_id": 1}, {"$set": {"status": "shipped"}})
    db.orders.update_one({"_id": 1}, {"$set": {"total": 12}})  # no route: status unchanged
    db.users.update_one({"_id": user_id}, {"$set": {"name": "Ada L."}})  # no route
    db.orders.insert_one({"_id": 2, "user_id": user_id, "status": "new"})
    db.orders.delete_one({"_id": 2})  # no route
    db.orders.insert_one({"_id": 3, "user_id": user_id, "status": "new"})  # the last one, a sentinel

    messages = queue.wait(7)
    # Per event in write order, its tasks (their order within an event follows route declaration).
    per_event: list[list[str]] = []
    for previous, message in zip([None, *messages], messages, strict=False):
        if previous is None or previous["payload"]["_id"] != message["payload"]["_id"]:
            per_event.append([])
        per_event[-1].append(message["task"])
    assert [sorted(tasks) for tasks in per_event] == [
        ["tasks.create_profile", "tasks.send_welcome_email"],
        ["tasks.update_analytics"],
        ["tasks.send_shipping_notification", "tasks.update_analytics"],
        ["tasks.update_analytics"],
        ["tasks.update_analytics"],
    ]
    for message in messages:
        payload = message["payload"]
        assert message["id"] == dedup_key(payload["_id"], message["task"])
        assert set(payload) <= set(PAYLOAD_FIELDS)
        assert message["envelope"]["headers"]["id"] == message["id"]
    by_task = {m["task"]: m["payload"] for m in messages}
    welcome, shipping, last = (
        by_task["tasks.send_welcome_email"],
        by_task["tasks.send_shipping_notification"],
        messages[-1]["payload"],
    )
    assert welcome["operationType"] == "insert"
    assert welcome["ns"] == {"db": db.name, "coll": "users"}
    assert welcome["documentKey"]["_id"] == user_id and isinstance(user_id, ObjectId)  # BSON type intact
    assert welcome["fullDocument"]["email"] == "ada@example.com"
    assert shipping["operationType"] == "update"
    assert shipping["updateDescription"]["updatedFields"] == {"status": "shipped"}
    assert shipping["fullDocument"]["status"] == "shipped"  # updateLookup: the current document
    assert messages[0]["payload"] == messages[1]["payload"]  # one payload per event

    wait_for(lambda: at_or_after(checkpoint(db), last["_id"]), "checkpoint after the last event")
    assert running.stop() == EXIT_OK
    assert len(queue.messages()) == 7


def test_checkpoint_waits_for_the_broker_and_nothing_is_lost(
    db: Database,
    queue: Queue,
    redis_server: RedisServer,
    start_listener: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    running = start_listener()
    db.users.insert_one({"email": "before@example.com"})
    before = queue.wait(2)[0]["payload"]["_id"]
    wait_for(lambda: at_or_after(checkpoint(db), before), "checkpoint after the first event")

    redis_server.stop()
    db.users.insert_one({"email": "during@example.com"})
    db.users.insert_one({"email": "during2@example.com"})
    wait_for(lambda: "broker unavailable" in caplog.text, "the listener to notice the outage")
    time.sleep(0.5)  # a few idle-checkpoint intervals (0.2 s): the checkpoint must still hold
    held = checkpoint(db)

    redis_server.start()  # an empty Redis on the same port: the earlier messages are gone
    messages = queue.wait(4)
    assert [m["payload"]["fullDocument"]["email"] for m in messages] == [
        "during@example.com",
        "during@example.com",
        "during2@example.com",
        "during2@example.com",
    ]
    first, last = messages[0]["payload"]["_id"], messages[-1]["payload"]["_id"]
    assert held is not None and not at_or_after(held, first)  # it stayed before the unpublished events
    wait_for(lambda: at_or_after(checkpoint(db), last), "checkpoint after the outage")
    assert running.stop() == EXIT_OK


def test_restart_resumes_after_the_checkpoint_without_gaps_or_repeats(
    db: Database, queue: Queue, start_listener: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    first = start_listener()
    assert "no checkpoint for stream test-listener: starting now" in caplog.text
    db.users.insert_one({"email": "u1@example.com"})
    queue.wait(2)
    assert first.stop() == EXIT_OK

    db.users.insert_one({"email": "u2@example.com"})  # written while no listener runs
    db.users.insert_one({"email": "u3@example.com"})

    second = start_listener()
    assert "resuming stream test-listener after checkpoint" in caplog.text
    db.orders.insert_one({"_id": "sentinel", "status": "new"})
    messages = queue.wait(7)
    assert [m["payload"]["fullDocument"].get("email") for m in messages] == [
        "u1@example.com",
        "u1@example.com",
        "u2@example.com",
        "u2@example.com",
        "u3@example.com",
        "u3@example.com",
        None,  # the sentinel order: everything before it was handled
    ]
    assert len({m["id"] for m in messages}) == 7
    assert second.stop() == EXIT_OK


def test_bson_values_once_refused_and_envelope_shaped_dicts_reach_the_tasks_as_stored(
    db: Database, queue: Queue, start_listener: Callable[..., Running]
) -> None:
    # Regex and Code used to be unpublishable (dead-lettered by the listener), and a dict with exactly
    # the keys __type__ and __value__ made the worker's decoding fail: all of them go through now.
    running = start_listener()
    odd = {
        "pattern": Regex("^a", "i"),
        "hook": Code("function () {}"),
        "prefs": {"__type__": "datetime", "__value__": "2026-01-02T03:04:05"},
    }
    db.users.insert_one({"email": "odd@example.com", **odd})
    db.users.insert_one({"email": "fine@example.com"})

    messages = queue.wait(4)
    documents = [m["payload"]["fullDocument"] for m in messages]
    assert [d["email"] for d in documents] == ["odd@example.com"] * 2 + ["fine@example.com"] * 2
    for document in documents[:2]:
        assert {key: document[key] for key in odd} == odd
        assert type(document["pattern"]) is Regex and type(document["hook"]) is Code
        assert type(document["prefs"]) is dict
    assert list(db.changeflow_dead_letters.find()) == []
    assert running.stop() == EXIT_OK


def fail_point(mongo_client: pymongo.MongoClient, app_name: str, mode: Any, **data: Any) -> int:
    """Sets failCommand for the listener's client; how often it fired since it was last set."""
    reply = mongo_client.admin.command(
        "configureFailPoint", "failCommand", mode=mode, data={"appName": app_name, **data}
    )
    return int(reply["count"])


@pytest.mark.needs_test_commands
def test_history_lost_stops_with_its_exit_code(
    db: Database,
    app_name: str,
    mongo_client: pymongo.MongoClient,
    start_listener: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    CheckpointStore(db).save(STREAM, {"_data": "00"})  # some old position
    fail_point(mongo_client, app_name, {"times": 1}, failCommands=["aggregate"], errorCode=286)
    try:
        running = start_listener()
        running.thread.join(TIMEOUT)
        assert running.code == EXIT_HISTORY_LOST
    finally:
        fail_point(mongo_client, app_name, "off")
    assert "history lost" in caplog.text
    assert checkpoint(db) == {"_data": "00"}  # left for a human to decide


@pytest.mark.needs_test_commands
def test_network_errors_reconnect_without_losing_events(
    db: Database,
    app_name: str,
    queue: Queue,
    mongo_client: pymongo.MongoClient,
    start_listener: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = start_listener()
    db.users.insert_one({"email": "a@example.com"})
    queue.wait(2)
    # The listener's next getMores and aggregates lose their connection, four times in a row. A fail
    # point acts when a command arrives, so the getMore already waiting for events is spared and
    # would hand over events written now unharmed: b and c are written only once the listener has
    # seen the failure, so they can reach Redis through its reconnect only.
    fail_point(
        mongo_client, app_name, {"times": 4}, failCommands=["getMore", "aggregate"], closeConnection=True
    )
    try:
        wait_for(lambda: "MongoDB error on stream" in caplog.text, "the listener's own reconnect")
        db.users.insert_one({"email": "b@example.com"})
        db.users.insert_one({"email": "c@example.com"})
        wanted = {
            (f"{user}@example.com", task)
            for user in "abc"
            for task in ("tasks.send_welcome_email", "tasks.create_profile")
        }
        messages = wait_for(lambda: wanted <= sent(m := queue.messages()) and m, "both tasks of b and c")
    finally:
        fired = fail_point(mongo_client, app_name, "off")
    assert fired == 4  # all four failures happened before b and c could be read
    assert sent(messages) == wanted  # a re-published message would carry the same task id: harmless
    assert running.stop() == EXIT_OK


def sent(messages: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(user email, task name) of each message."""
    return {(m["payload"]["fullDocument"]["email"], m["task"]) for m in messages}


def test_dropped_database_is_followed_after_the_invalidation(
    db: Database,
    queue: Queue,
    mongo_client: pymongo.MongoClient,
    start_listener: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = start_listener()
    db.users.insert_one({"email": "before-drop@example.com"})
    queue.wait(2)
    mongo_client.drop_database(db.name)
    db.users.insert_one({"email": "after-drop@example.com"})
    messages = queue.wait(4)
    assert [m["payload"]["fullDocument"]["email"] for m in messages[2:]] == ["after-drop@example.com"] * 2
    assert "invalidated" in caplog.text
    assert running.stop() == EXIT_OK
