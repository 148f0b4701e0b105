"""Profiles: one `profiles` document per user, created once with default settings."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from changeflow.worker.mongo import get_db
from tasks.app import app

DEFAULT_SETTINGS: dict[str, Any] = {"email_notifications": True, "language": "en", "timezone": "UTC"}


def new_profile(user: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The fields of a new profile (its _id is the user's _id)."""
    return {
        "user_id": user["_id"],
        "display_name": user.get("name") or "",
        "settings": dict(DEFAULT_SETTINGS),
        "created_at": now,
    }


def create_profile_once(db: Database, user: Mapping[str, Any]) -> bool:
    """Create the user's profile unless it exists; True when this call created it.

    `$setOnInsert` + upsert never overwrites an existing profile (the user may have changed it).
    """
    try:
        result = db.profiles.update_one(
            {"_id": user["_id"]}, {"$setOnInsert": new_profile(user, datetime.now(UTC))}, upsert=True
        )
    except DuplicateKeyError:
        return False  # a concurrent upsert inserted it first: already created
    return result.upserted_id is not None


@app.on("users", "insert", name="tasks.create_profile")
def create_profile(event: dict[str, Any]) -> None:
    """Create the profile of the user a users insert created."""
    user = event.get("fullDocument") or {"_id": event["documentKey"]["_id"]}
    create_profile_once(get_db(), user)
