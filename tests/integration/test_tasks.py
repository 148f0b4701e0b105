"""Each task's effect happens once per key, against real servers: a private redis-server, the
MongoDB test server (or MONGODB_URI), and an SMTP sink. Tasks run in-process through `apply()`
with the task id the listener would set (the dedup key)."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from bson import Decimal128, ObjectId, Timestamp
from pymongo.database import Database

from changeflow.worker.dedup import get_dedup_store
from changeflow.worker.keys import dedup_key
from changeflow.worker.settings import Settings
from changeflow.worker.testing import configured
from harness.redis_server import RedisServer
from harness.smtp_sink import SmtpSink
from tasks.analytics import Bucket, count_once, update_analytics
from tasks.email import send_shipping_notification, send_welcome_email
from tasks.profiles import create_profile, create_profile_once

WALL = dt.datetime(2026, 11, 23, 19, 38, 14, 123000)


def change_event(coll: str, operation: str, document_id: Any, **fields: Any) -> dict[str, Any]:
    """A trimmed change event as the listener publishes it, with a fresh resume token."""
    return {
        "_id": {"_data": uuid.uuid4().hex.upper()},
        "operationType": operation,
        "ns": {"db": "shop", "coll": coll},
        "documentKey": {"_id": document_id},
        "clusterTime": Timestamp(1_763_926_694, 1),
        "wallTime": WALL,
        **fields,
    }


def user_insert(user: dict[str, Any]) -> dict[str, Any]:
    return change_event("users", "insert", user["_id"], fullDocument=user)


def order_update(
    order: dict[str, Any], updated: dict[str, Any], *, post_image: bool = True
) -> dict[str, Any]:
    extra: dict[str, Any] = {"fullDocument": {**order, **updated}} if post_image else {}
    description = {"updatedFields": updated, "removedFields": [], "truncatedArrays": []}
    return change_event("orders", "update", order["_id"], updateDescription=description, **extra)


def run(task: Any, event: dict[str, Any]) -> Any:
    """Deliver `event` to `task` like a worker would, with the listener's task id."""
    return task.apply(args=[event], task_id=dedup_key(event["_id"], task.name))


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


def servers(redis_server: RedisServer, smtp: SmtpSink, **more: str) -> dict[str, str]:
    return {
        "CELERY_BROKER_URL": redis_server.url,
        "REDIS_URL": redis_server.url,
        "SMTP_HOST": smtp.host,
        "SMTP_PORT": str(smtp.port),
        "TASK_MAX_RETRIES": "2",
        **more,
    }


@pytest.fixture
def mail_worker(redis_server: RedisServer, smtp: SmtpSink) -> Iterator[Settings]:
    """The worker side for tasks that need no MongoDB (welcome mail, skips)."""
    with configured(**servers(redis_server, smtp)) as settings:
        yield settings


@pytest.fixture
def worker(redis_server: RedisServer, smtp: SmtpSink, mongodb_uri: str, db: Database) -> Iterator[Settings]:
    with configured(**servers(redis_server, smtp, MONGODB_URI=mongodb_uri, MONGODB_DB=db.name)) as settings:
        yield settings


# --- welcome email ------------------------------------------------------------------------------


def test_welcome_email_is_sent_once_per_key(
    mail_worker: Settings, smtp: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    event = user_insert({"_id": ObjectId(), "email": "ada@example.com", "name": "Ada"})
    key = dedup_key(event["_id"], "tasks.send_welcome_email")
    caplog.set_level(logging.INFO, logger="changeflow.worker.idempotent")

    first = run(send_welcome_email, event)
    second = run(send_welcome_email, event)

    assert (first.state, second.state) == ("SUCCESS", "SUCCESS")
    [message] = smtp.wait_for(1)
    assert smtp.count_by_message_id() == {f"<{key}@changeflow>": 1}
    assert message.envelope_rcpt == ["ada@example.com"]
    assert message["From"] == mail_worker.mail_from
    assert get_dedup_store().outcome(key) == "ok"
    assert f"duplicate tasks.send_welcome_email {key}" in caplog.text


def test_each_event_gets_its_own_email(mail_worker: Settings, smtp: SmtpSink) -> None:
    for i in range(3):
        run(send_welcome_email, user_insert({"_id": i, "email": f"u{i}@example.com"}))
    smtp.wait_for(3)
    assert sorted(smtp.count_by_message_id().values()) == [1, 1, 1]


def test_user_without_email_is_a_dead_letter_and_stays_replayable(
    worker: Settings, smtp: SmtpSink, db: Database
) -> None:
    event = user_insert({"_id": ObjectId(), "name": "No Mail"})
    key = dedup_key(event["_id"], "tasks.send_welcome_email")

    result = run(send_welcome_email, event)

    assert result.state == "FAILURE"
    letter = db.changeflow_dead_letters.find_one({"_id": key})
    assert letter is not None
    assert (letter["reason"], letter["task"], letter["attempts"]) == (
        "permanent",
        "tasks.send_welcome_email",
        1,
    )
    assert letter["event_id"] == event["_id"]
    assert "no valid email" in letter["error"]
    assert letter["payload"]["fullDocument"]["name"] == "No Mail"
    assert smtp.messages == []
    store = get_dedup_store()
    assert not store.is_done(key)  # a replay after fixing the user runs it
    assert store.lease_owner(key) is None

    event["fullDocument"]["email"] = "fixed@example.com"  # the data was fixed; the replay works
    assert run(send_welcome_email, event).state == "SUCCESS"
    assert smtp.wait_for(1)[0].envelope_rcpt == ["fixed@example.com"]


# --- profiles -----------------------------------------------------------------------------------


def test_profile_is_created_once(worker: Settings, db: Database) -> None:
    user = {"_id": ObjectId(), "email": "ada@example.com", "name": "Ada"}
    event = user_insert(user)

    assert run(create_profile, event).state == "SUCCESS"
    db.profiles.update_one({"_id": user["_id"]}, {"$set": {"settings.language": "fr"}})  # the user edits it
    assert run(create_profile, event).state == "SUCCESS"

    profiles = list(db.profiles.find())
    assert len(profiles) == 1
    assert profiles[0]["_id"] == user["_id"]
    assert profiles[0]["display_name"] == "Ada"
    assert profiles[0]["settings"]["language"] == "fr"  # not reset by the second delivery


def test_profile_upsert_is_idempotent_without_the_dedup_store(db: Database) -> None:
    # A worker that died after the upsert, before marking the key done: the effect itself holds.
    user = {"_id": 7, "name": "Bo"}
    assert create_profile_once(db, user) is True
    assert create_profile_once(db, user) is False
    assert db.profiles.count_documents({}) == 1


# --- shipping notifications ---------------------------------------------------------------------


def order_with_user(db: Database) -> tuple[dict[str, Any], dict[str, Any]]:
    user = {"_id": ObjectId(), "email": "buyer@example.com", "name": "Buyer"}
    order = {"_id": ObjectId(), "user_id": user["_id"], "status": "paid", "total": Decimal128("42.50")}
    db.users.insert_one(user)
    db.orders.insert_one(order)
    return user, order


@pytest.mark.parametrize("status", ["shipped", "delivered"])
def test_shipping_notification_is_sent_once(
    worker: Settings, smtp: SmtpSink, db: Database, status: str
) -> None:
    _, order = order_with_user(db)
    event = order_update(order, {"status": status})
    key = dedup_key(event["_id"], "tasks.send_shipping_notification")

    assert run(send_shipping_notification, event).state == "SUCCESS"
    assert run(send_shipping_notification, event).state == "SUCCESS"

    [message] = smtp.wait_for(1)
    assert smtp.count_by_message_id() == {f"<{key}@changeflow>": 1}
    assert message.envelope_rcpt == ["buyer@example.com"]
    assert str(order["_id"]) in message["Subject"]
    assert "42.50" in message.get_content()


def test_shipping_notification_reads_the_order_when_the_event_has_no_post_image(
    worker: Settings, smtp: SmtpSink, db: Database
) -> None:
    _, order = order_with_user(db)
    assert run(
        send_shipping_notification, order_update(order, {"status": "shipped"}, post_image=False)
    ).successful()
    assert smtp.wait_for(1)[0].envelope_rcpt == ["buyer@example.com"]


@pytest.mark.parametrize("status", ["paid", "cancelled"])
def test_other_statuses_are_a_logged_skip(
    mail_worker: Settings, smtp: SmtpSink, caplog: pytest.LogCaptureFixture, status: str
) -> None:
    caplog.set_level(logging.INFO, logger="changeflow.worker.idempotent")
    order = {"_id": 1, "user_id": 2, "status": "new"}
    event = order_update(order, {"status": status})
    key = dedup_key(event["_id"], "tasks.send_shipping_notification")

    assert run(send_shipping_notification, event).state == "SUCCESS"

    assert smtp.messages == []
    assert get_dedup_store().outcome(key) == "skipped"
    [record] = [r for r in caplog.records if r.getMessage().startswith("skip ")]
    assert record.levelno == logging.INFO
    assert key in record.getMessage() and status in record.getMessage()


def test_order_of_a_missing_user_is_a_dead_letter(worker: Settings, smtp: SmtpSink, db: Database) -> None:
    order = {"_id": ObjectId(), "user_id": ObjectId(), "status": "paid"}
    event = order_update(order, {"status": "shipped"})
    key = dedup_key(event["_id"], "tasks.send_shipping_notification")

    assert run(send_shipping_notification, event).state == "FAILURE"

    letter = db.changeflow_dead_letters.find_one({"_id": key})
    assert letter is not None and letter["reason"] == "permanent"
    assert "missing user" in letter["error"]
    assert smtp.messages == []
    assert not get_dedup_store().is_done(key)


# --- analytics ----------------------------------------------------------------------------------


def test_analytics_count_each_event_once(worker: Settings, db: Database) -> None:
    order = {"_id": ObjectId(), "user_id": 1, "status": "paid"}
    events = [
        change_event("orders", "insert", order["_id"], fullDocument=order),
        order_update(order, {"status": "shipped"}),
        order_update(order, {"status": "shipped"}),  # another event with the same change: counted too
    ]
    for event in events:
        assert run(update_analytics, event).state == "SUCCESS"
        assert run(update_analytics, event).state == "SUCCESS"  # redelivered: not counted again

    counters = {c["_id"]: c for c in db.order_analytics.find()}
    assert {k: c["count"] for k, c in counters.items()} == {"2026-11-23:paid": 1, "2026-11-23:shipped": 2}
    assert (counters["2026-11-23:shipped"]["day"], counters["2026-11-23:shipped"]["status"]) == (
        "2026-11-23",
        "shipped",
    )
    assert db.order_analytics_applied.count_documents({}) == 3


def test_analytics_count_once_even_when_the_done_record_is_missing(worker: Settings, db: Database) -> None:
    # A worker that died after the transaction committed, before marking the key done.
    bucket = Bucket("2026-11-23", "shipped")
    assert count_once(db, "key-1", bucket) is True
    assert count_once(db, "key-1", bucket) is False
    assert count_once(db, "key-2", bucket) is True
    assert db.order_analytics.find_one({"_id": bucket.id})["count"] == 2


def test_analytics_skip_events_without_status(mail_worker: Settings) -> None:
    event = order_update({"_id": 1, "status": "paid"}, {"total": 3})
    key = dedup_key(event["_id"], "tasks.update_analytics")
    assert run(update_analytics, event).state == "SUCCESS"
    assert get_dedup_store().outcome(key) == "skipped"
