"""The backfill records: one document per backfill in `changeflow_backfills` (MongoDB).

    {_id: <id>, app, collection, task, filter: <canonical Extended JSON text>, batch, rate,
     state: "running" | "interrupted" | "done", total, counts: {published, dead_lettered},
     started: true once a batch was saved, last_id: the last _id published, runs: how many runs
     (the first and each resume), owner: "<host>:<pid>" of the process running it,
     started_at, updated_at, ended_at, error}

Kept beside the listener's checkpoints (`changeflow_checkpoints`), in the watched database: a
backup moves the data and the positions together. The position is saved only after the batch it
covers was published, by the process that owns the record (`owner`): a second process resuming the
same backfill takes the record over, and the first one's later saves are refused (`TakenOver`).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pymongo import DESCENDING
from pymongo.database import Database

COLLECTION = "changeflow_backfills"
RUNNING, INTERRUPTED, DONE = "running", "interrupted", "done"


class TakenOver(Exception):
    """Another process took this backfill over (a resume with --force): this one must stop."""


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_gone(owner: object, host: str | None = None) -> bool:
    """Whether `owner` ("host:pid") is a process of this host that no longer exists (pure but for kill 0)."""
    if not isinstance(owner, str) or ":" not in owner:
        return False
    owner_host, _, pid_text = owner.rpartition(":")
    if owner_host != (host or socket.gethostname()) or not pid_text.isdigit():
        return False  # another machine's process: cannot be told from here
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, someone else's
    return False


class BackfillStore:
    def __init__(self, db: Database, collection: str = COLLECTION) -> None:
        self.collection = db[collection]

    def create(
        self,
        *,
        app: str,
        collection: str,
        task: str,
        filter_text: str,
        batch: int,
        rate: float | None,
        total: int,
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        record: dict[str, Any] = {
            "_id": uuid.uuid4().hex[:12],
            "app": app,
            "collection": collection,
            "task": task,
            "filter": filter_text,
            "batch": batch,
            "rate": rate,
            "state": RUNNING,
            "total": total,
            "counts": {"published": 0, "dead_lettered": 0},
            "started": False,
            "last_id": None,
            "runs": 1,
            "owner": this_process(),
            "started_at": now,
            "updated_at": now,
            "ended_at": None,
            "error": None,
        }
        self.collection.insert_one(record)
        return record

    def get(self, backfill_id: str) -> dict[str, Any] | None:
        return self.collection.find_one({"_id": backfill_id})

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self.collection.find().sort("started_at", DESCENDING).limit(limit))

    def take_over(self, record: Mapping[str, Any], *, total: int) -> dict[str, Any] | None:
        """Make this process the owner of `record` for a resume; None if it changed meanwhile.

        Compare-and-set on `updated_at`: of two resumes started at once, one wins.
        """
        now = datetime.now(UTC)
        changes = {
            "state": RUNNING,
            "owner": this_process(),
            "updated_at": now,
            "ended_at": None,
            "error": None,
            "total": total,
        }
        found = self.collection.find_one_and_update(
            {"_id": record["_id"], "updated_at": record["updated_at"]},
            {"$set": changes, "$inc": {"runs": 1}},
            return_document=True,
        )
        return found

    def save_position(self, backfill_id: str, last_id: Any, counts: Mapping[str, int]) -> None:
        """Record that everything up to `last_id` was published (call only after it was)."""
        self._update(
            backfill_id,
            {"last_id": last_id, "started": True, "counts": dict(counts), "updated_at": datetime.now(UTC)},
        )

    def finish(
        self, backfill_id: str, state: str, counts: Mapping[str, int], error: str | None = None
    ) -> None:
        now = datetime.now(UTC)
        self._update(
            backfill_id,
            {
                "state": state,
                "counts": dict(counts),
                "updated_at": now,
                "ended_at": now,
                "error": error,
            },
        )

    def _update(self, backfill_id: str, fields: Mapping[str, Any]) -> None:
        result = self.collection.update_one(
            {"_id": backfill_id, "owner": this_process()}, {"$set": dict(fields)}
        )
        if result.matched_count == 0:
            raise TakenOver(f"backfill {backfill_id} was taken over by another process")
