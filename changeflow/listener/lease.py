"""One active listener per stream: a lease in MongoDB with a fencing token (the epoch).

The collection `changeflow_leases` holds one document per stream:
`{_id: <stream>, owner, epoch, expires_at, acquired_at, renewed_at}`.

- acquire: findOneAndUpdate on `{_id: stream, $or: [{expires_at <= now}, {owner: me}]}`, setting
  `owner = me`, `expires_at = now + ttl` and incrementing `epoch` (upsert: the first listener ever
  creates it with epoch 1). While another owner holds an unexpired lease the filter matches nothing
  and the upsert collides on _id (DuplicateKeyError): not acquired, the caller stays standby.
- renew: `update {_id, owner: me, epoch: mine}` -> `expires_at = now + ttl`; no match means another
  listener took over (LeaseLost).
- release (clean stop): expires it at once, so a standby takes over within its poll interval.

The epoch is the fencing token: checkpoint saves carry it (changeflow/listener/checkpoints.py), so a stale
former leader cannot move a checkpoint after the new leader claimed it.

Clock: `now` is the MongoDB server's clock (`hello.localTime`, read before each acquire/renew), so
listeners on machines with skewed clocks agree on expiry. Only when the server does not report it
(never on mongod) the local wall clock is used. Local time (monotonic) only decides when to renew.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

COLLECTION = "changeflow_leases"

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another listener holds the lease now (or took it over while this one was stalled)."""


@dataclass(frozen=True)
class Holder:
    owner: str
    epoch: int
    expires_at: datetime | None


def default_owner() -> str:
    """host:pid:random, unique per process (a restarted process is a new owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def server_clock(db: Database) -> Callable[[], datetime]:
    """The server's current time (hello.localTime, UTC), falling back to the local wall clock."""

    def now() -> datetime:
        local_time = db.client.admin.command("hello").get("localTime")
        if isinstance(local_time, datetime):
            return local_time if local_time.tzinfo else local_time.replace(tzinfo=UTC)
        return datetime.now(UTC)

    return now


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Lease:
    """The lease of one stream for one owner (this process)."""

    def __init__(
        self,
        db: Database,
        stream: str,
        *,
        owner: str | None = None,
        ttl_seconds: float = 6.0,
        renew_seconds: float = 2.0,
        clock: Callable[[], datetime] | None = None,
        collection: str = COLLECTION,
    ) -> None:
        if not 0 < renew_seconds < ttl_seconds:
            raise ValueError(f"need 0 < renew < ttl, got renew={renew_seconds} ttl={ttl_seconds}")
        self.collection = db[collection]
        self.stream = stream
        self.owner = owner or default_owner()
        self.ttl = timedelta(seconds=ttl_seconds)
        self.renew_seconds = renew_seconds
        # A standby polls twice per renew interval: takeover <= ttl + poll after the holder's last renew.
        self.poll_seconds = renew_seconds / 2
        self.clock = clock or server_clock(db)
        self.epoch: int | None = None  # set while held
        self.holder: Holder | None = None  # the holder seen by the last failed acquire
        self._renewed_at = 0.0  # time.monotonic() of the last successful acquire/renew

    @property
    def held(self) -> bool:
        return self.epoch is not None

    @property
    def renew_due(self) -> bool:
        return time.monotonic() - self._renewed_at >= self.renew_seconds

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired (a new epoch); False while another owner holds it."""
        now = self.clock()
        started = time.monotonic()
        try:
            document = self.collection.find_one_and_update(
                {"_id": self.stream, "$or": [{"expires_at": {"$lte": now}}, {"owner": self.owner}]},
                {
                    "$set": {
                        "owner": self.owner,
                        "expires_at": now + self.ttl,
                        "acquired_at": now,
                        "renewed_at": now,
                    },
                    "$inc": {"epoch": 1},
                },
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            current = self.collection.find_one({"_id": self.stream}) or {}
            self.holder = Holder(
                str(current.get("owner")), int(current.get("epoch") or 0), _utc(current.get("expires_at"))
            )
            return False
        self.epoch = int(document["epoch"])
        self.holder = None
        self._renewed_at = started
        return True

    def renew(self) -> None:
        """Extend the lease; LeaseLost when another owner (or a newer epoch) holds it now."""
        if self.epoch is None:
            raise LeaseLost(f"lease of stream {self.stream} is not held")
        now = self.clock()
        started = time.monotonic()
        result = self.collection.update_one(
            {"_id": self.stream, "owner": self.owner, "epoch": self.epoch},
            {"$set": {"expires_at": now + self.ttl, "renewed_at": now}},
        )
        if result.matched_count == 0:
            epoch, self.epoch = self.epoch, None
            current = self.collection.find_one({"_id": self.stream}) or {}
            raise LeaseLost(
                f"lease of stream {self.stream} (epoch {epoch}) was taken over by "
                f"{current.get('owner')} (epoch {current.get('epoch')})"
            )
        self._renewed_at = started

    def renew_if_due(self) -> None:
        if self.renew_due:
            self.renew()

    def forget(self) -> None:
        """Consider the lease lost without touching MongoDB (after LeaseLost/FencedOut)."""
        self.epoch = None

    def release(self) -> None:
        """Give the lease up (clean stop): expire it now so a standby takes over at its next poll."""
        if self.epoch is None:
            return
        epoch, self.epoch = self.epoch, None
        self.collection.update_one(
            {"_id": self.stream, "owner": self.owner, "epoch": epoch},
            {"$set": {"expires_at": datetime(1970, 1, 1, tzinfo=UTC)}},
        )
