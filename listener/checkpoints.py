"""Where the listener remembers how far it got: one resume token per stream, in MongoDB.

The collection `changeflow_checkpoints` holds `{_id: <stream name>, resume_token, updated_at}`.
A checkpoint only moves after every event before it was published (or dead-lettered), so a
restart resumes after the last event whose tasks are safely in the broker: nothing is skipped,
and what is repeated carries the same task ids.

Kept in the watched database on purpose: the token belongs to that deployment's oplog, and one
backup or restore moves data and position together.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pymongo.database import Database

COLLECTION = "changeflow_checkpoints"

ResumeToken = Mapping[str, Any]


class CheckpointStore:
    """Loads and saves resume tokens, one document per stream name."""

    def __init__(self, db: Database, collection: str = COLLECTION) -> None:
        self.collection = db[collection]

    def load(self, stream: str) -> ResumeToken | None:
        """The saved resume token of `stream`, or None when it never saved one."""
        document = self.collection.find_one({"_id": stream}, {"resume_token": 1})
        if document is None:
            return None
        token: ResumeToken | None = document.get("resume_token")
        return token

    def save(self, stream: str, token: ResumeToken) -> None:
        """Record `token` as the position of `stream`."""
        # The filter is the hook for listener failover: a fenced save adds the holder's lease epoch
        # (`{"_id": stream, "epoch": {"$lte": epoch}}`); a stale listener's upsert then collides on
        # _id (DuplicateKeyError) instead of moving the checkpoint back.
        self.collection.update_one(
            self._owned(stream),
            {"$set": {"resume_token": dict(token), "updated_at": datetime.now(UTC)}},
            upsert=True,
        )

    def _owned(self, stream: str) -> dict[str, Any]:
        return {"_id": stream}
