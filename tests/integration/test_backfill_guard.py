"""The guard runs a backfill event with its document as it is now (changeflow/worker/backfill.py).

Real redis-server (dedup store) and MongoDB (the test server, or MONGODB_URI); the task runs under
apply() with its dedup key as id, as a worker would run it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from bson import ObjectId
from pymongo.database import Database

from changeflow.backfill.events import backfill_event, backfill_message
from changeflow.worker.backfill import MARKER
from changeflow.worker.dedup import get_dedup_store
from changeflow.worker.settings import Settings
from changeflow.worker.testing import configured
from harness.redis_server import RedisServer
from harness.smtp_sink import SmtpSink
from tasks.profiles import create_profile

from .test_tasks import servers


@pytest.fixture
def worker(redis_server: RedisServer, mongodb_uri: str, db: Database) -> Iterator[Settings]:
    with (
        SmtpSink() as smtp,
        configured(**servers(redis_server, smtp, MONGODB_URI=mongodb_uri, MONGODB_DB=db.name)) as settings,
    ):
        yield settings


def test_a_backfill_event_applies_the_document_as_it_is_when_the_task_runs(
    worker: Settings, db: Database
) -> None:
    user = {"_id": ObjectId(), "name": "Old Name"}
    db.users.insert_one(user)
    message = backfill_message(
        backfill_event(db.name, "users", user, "bf1", datetime.now(UTC)), "tasks.create_profile"
    )
    db.users.update_one({"_id": user["_id"]}, {"$set": {"name": "New Name"}})  # a live change meanwhile

    result = create_profile.apply(args=[message.payload], task_id=message.task_id)

    assert result.state == "SUCCESS"
    profile = db.profiles.find_one({"_id": user["_id"]})
    assert profile is not None and profile["display_name"] == "New Name"  # not the state the backfill read
    assert get_dedup_store().is_done(message.task_id)
    assert message.payload["fullDocument"]["name"] == "Old Name"  # the message itself is untouched


def test_a_backfill_event_of_a_deleted_document_is_skipped_and_done(worker: Settings, db: Database) -> None:
    user = {"_id": ObjectId(), "name": "Gone"}
    db.users.insert_one(user)
    message = backfill_message(
        backfill_event(db.name, "users", user, "bf1", datetime.now(UTC)), "tasks.create_profile"
    )
    db.users.delete_one({"_id": user["_id"]})

    result = create_profile.apply(args=[message.payload], task_id=message.task_id)

    assert result.state == "SUCCESS"
    assert db.profiles.count_documents({}) == 0
    assert get_dedup_store().is_done(message.task_id)
    assert message.payload[MARKER] == {"id": "bf1"}


def test_a_live_event_is_applied_as_it_came(worker: Settings, db: Database) -> None:
    user = {"_id": ObjectId(), "name": "As Sent"}
    db.users.insert_one({**user, "name": "Changed Since"})
    live = {
        "_id": {"_data": "82" + "0" * 30},
        "operationType": "insert",
        "ns": {"db": db.name, "coll": "users"},
        "documentKey": {"_id": user["_id"]},
        "fullDocument": user,
    }
    assert create_profile.apply(args=[live], task_id=f"live-{user['_id']}").state == "SUCCESS"
    profile = db.profiles.find_one({"_id": user["_id"]})
    assert profile is not None and profile["display_name"] == "As Sent"
