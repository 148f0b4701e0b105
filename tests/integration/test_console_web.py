"""The console's pages and actions through Starlette's TestClient, on the MongoDB test server and a
private redis-server: auth, escaping, filters, the letter page, CSRF and Origin refusals, purge with
confirmation, replay (read back from the broker's list as a worker would), and the start-up refusal.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from bson import ObjectId
from pymongo.database import Database
from starlette.testclient import TestClient

from changeflow.console.csrf import COOKIE, FIELD
from changeflow.console.web import Console, create_app
from changeflow.listener.checkpoints import CheckpointStore
from changeflow.listener.metrics import oldest_oplog_time
from changeflow.listener.publish import make_publisher
from changeflow.worker.dead_letters import COLLECTION
from changeflow.worker.testing import configured
from harness.redis_server import RedisServer
from tests.integration.test_dead_letters_cli import WELCOME, event, seed
from tests.integration.test_listener import Queue

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "console-test-password-42"
AUTH = ("ops", PASSWORD)


@pytest.fixture
def console(mongodb_uri: str, db: Database, redis_server: RedisServer) -> Iterator[TestClient]:
    env = {
        "MONGODB_URI": mongodb_uri,
        "MONGODB_DB": db.name,
        "CELERY_BROKER_URL": redis_server.url,
        "REDIS_URL": redis_server.url,
        "CONSOLE_USER": "ops",
        "CONSOLE_PASSWORD": PASSWORD,
        "FLOWER_URL": "http://127.0.0.1:5555/",
        "LISTENER_STREAM_NAME": f"console-{ObjectId()}",
    }
    with configured(**env) as settings:
        from worker import app

        web = create_app(Console(settings, db, app, make_publisher=lambda: make_publisher(settings, app)))
        with TestClient(web, base_url="http://127.0.0.1:8100") as client:
            yield client


def form_token(html: str) -> str:
    match = re.search(rf'name="{FIELD}" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def letter_with_email(db: Database, n: int = 1, name: str = "No Email") -> str:
    user = {"_id": ObjectId(), "name": name}
    db.users.insert_one(user)
    return seed(db, WELCOME, event(db, user, n))


def test_every_page_needs_the_password(console: TestClient, db: Database) -> None:
    for path in ("/", "/dead-letters", "/dead-letters/x", "/static/console.css"):
        refused = console.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"].startswith("Basic ")
        assert PASSWORD not in refused.text
        assert console.get(path, auth=("ops", "wrong")).status_code == 401
        assert console.get(path, auth=("admin", PASSWORD)).status_code == 401
    assert console.post("/dead-letters/purge", data={"id": "x"}).status_code == 401
    assert console.get("/health").status_code == 200  # for probes: says nothing but "ok"
    page = console.get("/", auth=AUTH)
    assert page.status_code == 200
    assert "No checkpoint saved yet" in page.text and "heartbeat not visible here" in page.text
    assert 'href="http://127.0.0.1:5555/"' in page.text  # FLOWER_URL
    assert PASSWORD not in page.text


def test_the_status_page_shows_lag_and_oplog_headroom(console: TestClient, db: Database) -> None:
    """With a saved checkpoint, the page reads the oplog window from the server (local.oplog.rs)."""
    stream = re.search(r"stream <code>([^<]+)</code>", console.get("/", auth=AUTH).text).group(1)
    oldest = oldest_oplog_time(db.client)
    assert oldest is not None
    position = oldest + timedelta(minutes=5)
    CheckpointStore(db).save(stream, {"_data": "82"}, epoch=1, position_time=position)
    page = console.get("/", auth=AUTH)
    assert page.status_code == 200
    assert re.search(r'id="oplog-headroom">(\d+m \d{2}s)<', page.text).group(1) == "5m 00s"
    assert 'id="checkpoint-age">' in page.text and "oplog window unavailable" not in page.text


def test_the_list_escapes_what_it_shows_and_filters(console: TestClient, db: Database) -> None:
    welcome = letter_with_email(db)
    hostile = {"_id": ObjectId(), "name": "x"}
    db.users.insert_one(hostile)
    seed(db, "tasks.create_profile", event(db, hostile, 2), reason="retries_exhausted",
         error="<script>alert('x')</script> failed")  # fmt: skip
    page = console.get("/dead-letters", auth=AUTH)
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "&lt;script&gt;alert(" in page.text
    assert welcome in page.text and "tasks.create_profile" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")

    permanent = console.get("/dead-letters", params={"reason": "permanent"}, auth=AUTH).text
    assert welcome in permanent and "tasks.create_profile</a>" not in permanent
    by_task = console.get("/dead-letters", params={"task": "tasks.create_profile"}, auth=AUTH).text
    assert welcome not in by_task and "tasks.create_profile</a>" in by_task
    bad = console.get("/dead-letters", params={"reason": "nonsense"}, auth=AUTH).text
    assert "Ignored a filter: reason" in bad and welcome in bad  # the bad filter is dropped, said so


def test_a_letter_shows_its_event_error_and_traceback(console: TestClient, db: Database) -> None:
    key = letter_with_email(db, name="Ada <Lovelace>")
    page = console.get(f"/dead-letters/{key}", auth=AUTH)
    assert page.status_code == 200
    assert "PermanentTaskError: no valid email address: None" in page.text
    assert "Traceback (most recent call last)" in page.text
    assert "Ada &lt;Lovelace&gt;" in page.text and "Ada <Lovelace>" not in page.text
    assert '"operationType": "insert"' in html.unescape(page.text)
    assert console.get("/dead-letters/no-such-letter", auth=AUTH).status_code == 404


def test_posts_without_the_token_or_from_another_origin_change_nothing(
    console: TestClient, db: Database
) -> None:
    key = letter_with_email(db)
    token = form_token(console.get("/dead-letters", auth=AUTH).text)
    assert console.cookies.get(COOKIE)
    confirmed = {"id": key, "confirm": "yes"}
    no_token = console.post("/dead-letters/purge", data=confirmed, auth=AUTH)
    wrong_token = console.post("/dead-letters/purge", data={**confirmed, FIELD: token[::-1]}, auth=AUTH)
    other_site = console.post(
        "/dead-letters/purge",
        data={**confirmed, FIELD: token},
        headers={"Origin": "http://evil.example"},
        auth=AUTH,
    )
    cookie = console.cookies.get(COOKIE)
    console.cookies.clear()
    no_cookie = console.post("/dead-letters/purge", data={**confirmed, FIELD: token}, auth=AUTH)
    for refused in (no_token, wrong_token, other_site, no_cookie):
        assert refused.status_code == 403 and "Nothing was changed" in refused.text
    assert db[COLLECTION].count_documents({"_id": key}) == 1
    console.cookies.set(COOKIE, cookie)
    done = console.post(
        "/dead-letters/purge",
        data={**confirmed, FIELD: token},
        headers={"Origin": "http://127.0.0.1:8100"},
        auth=AUTH,
    )
    assert done.status_code == 200 and "Purged 1 dead letter" in done.text
    assert db[COLLECTION].count_documents({"_id": key}) == 0


def test_purge_asks_first(console: TestClient, db: Database) -> None:
    first, second, kept = letter_with_email(db, 1), letter_with_email(db, 2), letter_with_email(db, 3)
    token = form_token(console.get("/dead-letters", auth=AUTH).text)
    asked = console.post("/dead-letters/purge", data={FIELD: token, "id": [first, second]}, auth=AUTH)
    assert asked.status_code == 200 and "Purge 2 dead letters?" in asked.text
    assert db[COLLECTION].count_documents({}) == 3  # nothing deleted before the confirmation
    confirm_token = form_token(asked.text)
    done = console.post(
        "/dead-letters/purge", data={FIELD: confirm_token, "id": [first, second], "confirm": "yes"}, auth=AUTH
    )
    assert "Purged 2 dead letters" in done.text
    assert [d["_id"] for d in db[COLLECTION].find()] == [kept]
    missing = console.post("/dead-letters/purge", data={FIELD: token, "id": ["nope"]}, auth=AUTH)
    assert missing.status_code == 404 and "no dead letter with id nope" in missing.text


def test_replay_with_refresh_publishes_the_current_document(
    console: TestClient, db: Database, redis_server: RedisServer
) -> None:
    user = {"_id": ObjectId(), "name": "Late"}
    db.users.insert_one(user)
    key = seed(db, WELCOME, event(db, user, 1))
    db.users.update_one({"_id": user["_id"]}, {"$set": {"email": "late@example.com"}})
    token = form_token(console.get(f"/dead-letters/{key}", auth=AUTH).text)

    plain = console.post("/dead-letters/replay", data={FIELD: token, "id": key, "refresh": "0"}, auth=AUTH)
    assert plain.status_code == 200 and "replayed 1, skipped 0" in plain.text
    refreshed = console.post(
        "/dead-letters/replay", data={FIELD: token, "id": key, "refresh": "1"}, auth=AUTH
    )
    assert "replayed 1, skipped 0" in refreshed.text and "(refreshed)" in refreshed.text

    stored, current = Queue(redis_server.url).wait(2)
    assert stored["task"] == current["task"] == WELCOME and stored["id"] == current["id"] == key
    assert "email" not in stored["payload"]["fullDocument"]
    assert current["payload"]["fullDocument"]["email"] == "late@example.com"
    assert db[COLLECTION].find_one({"_id": key})["replay_count"] == 2


def test_the_console_refuses_to_serve_off_loopback_without_a_password(mongodb_uri: str, db: Database) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSOLE_")}
    env.update(PYTHONPATH=str(ROOT), MONGODB_URI=mongodb_uri, MONGODB_DB=db.name)
    done = subprocess.run(
        [sys.executable, "-m", "changeflow", "console", "-A", "worker", "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "CONSOLE_PASSWORD must be set" in done.stderr
