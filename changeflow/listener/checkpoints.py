"""Where the listener remembers how far it got: one resume token per stream, in MongoDB.

The collection `changeflow_checkpoints` holds
`{_id: <stream name>, resume_token, position_time, updated_at, epoch}`:

- `resume_token`: where the stream resumes;
- `position_time`: the time of that position (the wallTime of the last event of the batch, or, for an
  idle stream, a moment no later than the position); the start of the gap if history is ever lost;
- `updated_at`: when it was saved;
- `epoch`: the lease epoch (fencing token, `changeflow/listener/lease.py`) of the listener that saved it.

A checkpoint only moves after every event before it was published (or dead-lettered), so a
restart resumes after the last event whose tasks are safely in the broker: nothing is skipped,
and what is repeated carries the same task ids.

Fencing: a save with an `epoch` only applies where the stored epoch is not greater. A stale former
leader's save would have to create a second document with the same _id instead: the unique _id index
refuses it (DuplicateKeyError), reported as `FencedOut`. A new leader `claim()`s the checkpoint with
its epoch before loading it, so from then on the former leader cannot move it.

Kept in the watched database on purpose: the token belongs to that deployment's oplog, and one
backup or restore moves data and position together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

COLLECTION = "changeflow_checkpoints"

ResumeToken = Mapping[str, Any]


class FencedOut(Exception):
    """A checkpoint write was refused: a listener with a newer lease epoch owns the stream."""


@dataclass(frozen=True)
class Checkpoint:
    """A stored checkpoint; every field but the token may be missing in older documents."""

    token: ResumeToken | None
    position_time: datetime | None = None
    updated_at: datetime | None = None
    epoch: int | None = None


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class CheckpointStore:
    """Loads and saves resume tokens, one document per stream name."""

    def __init__(self, db: Database, collection: str = COLLECTION) -> None:
        self.collection = db[collection]

    def load(self, stream: str) -> ResumeToken | None:
        """The saved resume token of `stream`, or None when it never saved one."""
        record = self.load_record(stream)
        return None if record is None else record.token

    def load_record(self, stream: str) -> Checkpoint | None:
        """The whole checkpoint of `stream`, or None when there is no document."""
        document = self.collection.find_one({"_id": stream})
        if document is None:
            return None
        return Checkpoint(
            token=document.get("resume_token"),
            position_time=_utc(document.get("position_time")),
            updated_at=_utc(document.get("updated_at")),
            epoch=document.get("epoch"),
        )

    def save(
        self,
        stream: str,
        token: ResumeToken,
        epoch: int | None = None,
        position_time: datetime | None = None,
    ) -> None:
        """Record `token` as the position of `stream`.

        With `epoch` (the saver's lease epoch) the write is fenced: it raises FencedOut, and changes
        nothing, when the stored checkpoint carries a greater epoch. Without it the write is
        unconditional (a listener run without a lease, tests).
        """
        fields: dict[str, Any] = {"resume_token": dict(token), "updated_at": datetime.now(UTC)}
        if position_time is not None:
            fields["position_time"] = position_time
        if epoch is not None:
            fields["epoch"] = epoch
        self._fenced_upsert(stream, epoch, fields)

    def claim(self, stream: str, epoch: int) -> None:
        """Stamp the checkpoint of `stream` with `epoch`: older epochs can no longer save.

        Raises FencedOut if a greater epoch already claimed it. Creates `{_id, epoch}` (no token)
        when the stream has no checkpoint yet.
        """
        self._fenced_upsert(stream, epoch, {"epoch": epoch})

    def _fenced_upsert(self, stream: str, epoch: int | None, fields: dict[str, Any]) -> None:
        query: dict[str, Any] = {"_id": stream}
        if epoch is not None:
            query["epoch"] = {"$not": {"$gt": epoch}}  # also matches a document without an epoch
        try:
            self.collection.update_one(query, {"$set": fields}, upsert=True)
        except DuplicateKeyError:
            # No document matched the filter but one with this _id exists: its epoch is newer.
            current = self.collection.find_one({"_id": stream}, {"epoch": 1}) or {}
            raise FencedOut(
                f"checkpoint of stream {stream} belongs to epoch {current.get('epoch')}, not {epoch}"
            ) from None
