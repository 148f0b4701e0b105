"""The realtime parts against real servers: the emitter's publish on a private redis-server (and its
failure when Redis is down, which the dedup guard retries), the follower query of tasks.posts on
MongoDB, and the gateway's command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import redis
from bson import ObjectId
from pymongo.database import Database

from changeflow.realtime.emitter import get_emitter
from changeflow.realtime.tokens import read_token
from changeflow.worker.errors import is_transient
from changeflow.worker.settings import Settings
from harness.processes import REPO_ROOT
from harness.redis_server import RedisServer
from tasks.posts import follower_pages

SECRET = "a-realtime-secret-for-tests-" + "z" * 20


def test_an_emit_is_one_publish_on_the_channel_naming_every_room(redis_server: RedisServer) -> None:
    settings = Settings(realtime_redis_url=redis_server.url, realtime_channel="rt-test")
    subscriber = redis_server.client().pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe("rt-test")
    emitter = get_emitter(settings)
    assert get_emitter(settings) is emitter  # one per process and target

    receivers = emitter.send("feed_update", {"post_id": "p1"}, ["user:a", "user:b"])
    message = None
    deadline = time.monotonic() + 5
    while message is None and time.monotonic() < deadline:
        message = subscriber.get_message(timeout=0.5)
    subscriber.close()

    assert receivers == 1
    assert message is not None
    published = json.loads(message["data"])
    assert published["method"] == "emit"
    assert (published["event"], published["data"], published["room"]) == (
        "feed_update",
        [{"post_id": "p1"}],
        ["user:a", "user:b"],
    )
    assert published["namespace"] == "/"
    assert emitter.send("feed_update", {"post_id": "p1"}, []) == 0  # nobody to tell: no publish


def test_an_emit_redis_refuses_raises_a_transient_error() -> None:
    with RedisServer() as server:
        settings = Settings(realtime_redis_url=server.url, realtime_channel="rt-down")
        emitter = get_emitter(settings)
        assert emitter.send("new_post", {"post_id": "p"}, ["user:a"]) == 0  # up, nobody subscribed
        server.stop()
        with pytest.raises(redis.RedisError) as refused:
            emitter.send("new_post", {"post_id": "p"}, ["user:a"])
        assert is_transient(refused.value)  # the dedup guard retries the task, never marks it done
        server.restart()
        assert emitter.send("new_post", {"post_id": "p"}, ["user:a"]) == 0  # reconnects


def test_follower_pages_read_the_authors_followers_in_id_order(db: Database) -> None:
    author, other = ObjectId(), ObjectId()
    followers = [ObjectId() for _ in range(7)]
    db.followers.insert_many([{"user_id": author, "follower_id": f} for f in followers])
    db.followers.insert_many([{"user_id": other, "follower_id": ObjectId()} for _ in range(3)])

    result = list(follower_pages(db.followers, author, 3))

    assert [len(page) for page in result] == [3, 3, 1]
    ids = [doc["_id"] for page in result for doc in page]
    assert ids == sorted(ids)
    assert [doc["follower_id"] for page in result for doc in page] == followers


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", [["-m", "realtime"], ["-m", "changeflow", "realtime", "token", "u1"]])
def test_without_a_secret_the_gateway_refuses_to_start_naming_it(command: list[str]) -> None:
    done = run_cli(*command)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("invalid settings: REALTIME_SECRET must be set"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_short_secret_is_refused_without_being_shown() -> None:
    done = run_cli("-m", "realtime", REALTIME_SECRET="short-one-9f8e")
    assert done.returncode == 2
    assert "REALTIME_SECRET is too short" in done.stderr
    assert "short-one-9f8e" not in done.stderr + done.stdout


def test_the_token_command_prints_the_token_alone() -> None:
    done = run_cli(
        "-m", "changeflow", "realtime", "token", "65f1a2b3c4d5e6f708192a3b", REALTIME_SECRET=SECRET
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n") and len(done.stdout.splitlines()) == 1
    assert read_token(done.stdout.strip(), SECRET, 60) == "65f1a2b3c4d5e6f708192a3b"
    assert SECRET not in done.stdout + done.stderr
