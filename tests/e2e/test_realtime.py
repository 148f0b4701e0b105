"""Real-time notifications end to end, with real processes: redis-server, MongoDB (test server, or
MONGODB_URI), `python -m listener`, a `celery -A worker worker` and the gateway (`python -m realtime`),
and real Socket.IO clients (python-socketio). Users, followers and posts are written with pymongo."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import socketio
from bson import ObjectId

from changeflow.realtime.tokens import make_token
from harness.pipeline import LocalPipeline, wait_until

pytestmark = pytest.mark.e2e

EVENTS = ("new_post", "feed_update")


class Listener:
    """A Socket.IO client of the gateway that records what it receives (and why it was refused)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.client = socketio.Client(reconnection=False)
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.refusals: list[Any] = []
        self._lock = threading.Lock()
        for event in EVENTS:
            self.client.on(event, self._recorder(event))
        self.client.on("connect_error", self.refusals.append)

    def _recorder(self, event: str) -> Any:
        def record(data: dict[str, Any]) -> None:
            with self._lock:
                self.received.append((event, data))

        return record

    def connect(self, url: str, token: str | None) -> None:
        auth = {"token": token} if token is not None else None
        self.client.connect(url, auth=auth, transports=["websocket"], wait_timeout=10)

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [data for event, data in self.received if event == name]


@pytest.fixture
def pipeline() -> Iterator[LocalPipeline]:
    # Pages of 2 followers: the post's 5 followers take three emits.
    env = {"REALTIME_FOLLOWER_BATCH_SIZE": "2"}
    with LocalPipeline(workers=1, realtime_port=0, extra_env=env) as running:
        yield running


def test_without_the_demo_switch_the_gateway_hands_out_no_token(pipeline: LocalPipeline) -> None:
    url = pipeline.realtime_url
    with urllib.request.urlopen(f"{url}/health", timeout=10) as health:
        assert (health.status, json.load(health)) == (200, {"status": "ok"})
    with urllib.request.urlopen(f"{url}/", timeout=10) as page:
        assert b"live notifications" in page.read()
    login = urllib.request.Request(f"{url}/demo/login", data=b'{"user_id": "u1"}', method="POST")
    for request in (login, f"{url}/demo/users"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 404


def test_the_author_and_followers_are_told_live_and_nobody_else(pipeline: LocalPipeline) -> None:
    assert pipeline.realtime is not None
    url, secret = pipeline.realtime_url, pipeline.realtime_secret
    author, stranger = ObjectId(), ObjectId()
    followers = [ObjectId() for _ in range(5)]
    db = pipeline.db
    db.users.insert_many(
        [{"_id": author, "name": "Ada"}, {"_id": stranger, "name": "Sam"}]
        + [{"_id": f, "name": f"Follower {i}"} for i, f in enumerate(followers)]
    )
    db.followers.insert_many([{"user_id": author, "follower_id": f} for f in followers])
    # The stranger follows somebody else; the author follows nobody.
    db.followers.insert_one({"user_id": ObjectId(), "follower_id": stranger})

    tokens = {"author": make_token(author, secret), "first": make_token(followers[0], secret)}
    tokens["last"] = make_token(followers[4], secret)  # on the third page
    tokens["stranger"] = make_token(stranger, secret)
    clients = {name: Listener(name) for name in tokens}
    refused = {name: Listener(name) for name in ("forged", "expired", "missing")}
    try:
        for name, client in clients.items():
            client.connect(url, tokens[name])
        bad_tokens = {
            "forged": make_token(author, "not-the-gateway-secret-" + "q" * 20),
            "expired": make_token(author, secret, issued_at=int(time.time()) - 4000),  # TTL: 3600 s
            "missing": None,
        }
        for name, client in refused.items():
            with pytest.raises(socketio.exceptions.ConnectionError):
                client.connect(url, bad_tokens[name])

        post = {
            "_id": ObjectId(),
            "author_id": author,
            "text": "Hello, followers",
            # Non-zero milliseconds: relaxed Extended JSON leaves out a zero fraction (".000").
            "created_at": datetime.now(UTC).replace(microsecond=123456),
        }
        db.posts.insert_one(post)

        def arrived() -> bool:
            return all(
                [
                    clients["author"].events("new_post"),
                    clients["first"].events("feed_update"),
                    clients["last"].events("feed_update"),
                ]
            )

        assert wait_until(arrived, timeout=60), pipeline.logs()
        # The stranger's notification, were there one, left in the same emits: give it ample time.
        time.sleep(2)
        connected = {name: client.client.connected for name, client in clients.items()}
    finally:
        for client in [*clients.values(), *refused.values()]:
            client.client.disconnect()
    gateway_log = pipeline.realtime.log_text(since_start=False)

    assert connected == dict.fromkeys(clients, True)
    assert clients["stranger"].received == []
    assert [event for event, _ in clients["author"].received] == ["new_post"]
    assert [event for event, _ in clients["first"].received] == ["feed_update"]
    assert [event for event, _ in clients["last"].received] == ["feed_update"]

    new_post = clients["author"].events("new_post")[0]
    feed_update = clients["first"].events("feed_update")[0]
    assert feed_update == clients["last"].events("feed_update")[0]
    assert new_post == feed_update  # the same post, event id and author
    assert new_post["post_id"] == str(post["_id"])
    assert new_post["event_id"]  # the change event's id: with post_id, what a client dedups on
    assert new_post["author_name"] == "Ada"
    millis = post["created_at"].isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert new_post["post"] == {
        "_id": {"$oid": str(post["_id"])},
        "author_id": {"$oid": str(author)},
        "text": "Hello, followers",
        "created_at": {"$date": millis},
    }

    # Refused at connect, each with its reason; no token ever appears in the gateway's log.
    reasons = {name: [r.get("message") for r in client.refusals] for name, client in refused.items()}
    assert reasons == {
        "forged": ["forged token"],
        "expired": ["expired token"],
        "missing": ["missing token"],
    }
    assert not any(client.received for client in refused.values())
    for token in [*tokens.values(), *(t for t in bad_tokens.values() if t)]:
        assert token not in gateway_log
    assert secret not in gateway_log
    assert "Traceback" not in gateway_log, gateway_log
