"""The event log: one `user_registered` entry per new user in `event_log`.

    {type: "user_registered", user_id, metadata: {email}, created_at}

Exactly one entry per user however often the task runs: the entry is an upsert with `$setOnInsert`
on (type, user_id), which a unique index backs (two workers racing on a redelivery: one inserts, the
other's upsert fails with a duplicate key and counts as done). `created_at` is when the user was
written (the change's wallTime, else its clusterTime), so a redelivery writes the same entry.

A user without an email is logged all the same, with `metadata.email` None: the log records that the
account was registered, and an account can exist without an address (its welcome email is the one
that fails, as a dead letter naming the missing address).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from changeflow.worker.mongo import get_db
from tasks.analytics import event_time
from tasks.app import app
from tasks.indexes import ensure_index

COLLECTION = "event_log"
USER_REGISTERED = "user_registered"


def registration_entry(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event_log entry of a users insert (email as stored; None when the user has none)."""
    user = event.get("fullDocument")
    user = user if isinstance(user, Mapping) else {}
    user_id = user["_id"] if "_id" in user else event["documentKey"]["_id"]
    created_at: datetime = event_time(event)
    return {
        "type": USER_REGISTERED,
        "user_id": user_id,
        "metadata": {"email": user.get("email")},
        "created_at": created_at,
    }


def log_once(db: Database, entry: Mapping[str, Any]) -> bool:
    """Insert `entry` unless its (type, user_id) is logged; True when this call inserted it."""
    ensure_index(db, COLLECTION, [("type", 1), ("user_id", 1)], unique=True)
    try:
        result = db[COLLECTION].update_one(
            {"type": entry["type"], "user_id": entry["user_id"]}, {"$setOnInsert": dict(entry)}, upsert=True
        )
    except DuplicateKeyError:
        return False  # a concurrent delivery inserted it first
    return result.upserted_id is not None


@app.on("users", "insert", name="tasks.log_registration")
def log_registration(event: dict[str, Any]) -> None:
    """Record the registration of the user a users insert created."""
    log_once(get_db(), registration_entry(event))
