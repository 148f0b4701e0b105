"""The application's side of a scenario: plain pymongo writes, paced over a few seconds in a thread.

The fault is injected by the scenario's main thread while this thread writes, so faults land in the
middle of the stream rather than before or after it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from bson import ObjectId
from pymongo.database import Database

from harness.workload import Workload

Write = Callable[[Database], object]
T = TypeVar("T")


def workload_writes(work: Workload) -> list[Write]:
    """harness.workload.apply as a list of single writes, in the same order."""
    writes: list[Write] = []
    for user in work.users:
        writes.append(lambda db, doc=dict(user): db.users.insert_one(doc))
    for order in work.orders:
        writes.append(lambda db, doc=dict(order): db.orders.insert_one(doc))
    writes.extend(set_status(order_id, status) for order_id, status in work.transitions)
    return writes


def insert(collection: str, document: dict) -> Write:
    return lambda db: db[collection].insert_one(dict(document))


def set_status(order_id: ObjectId, status: str) -> Write:
    return lambda db: db.orders.update_one({"_id": order_id}, {"$set": {"status": status}})


def interleave(first: Sequence[T], second: Sequence[T], rng: random.Random) -> list[T]:
    """Both sequences merged at random positions, each keeping its own order."""
    slots = [0] * len(first) + [1] * len(second)
    rng.shuffle(slots)
    sources = (iter(first), iter(second))
    return [next(sources[slot]) for slot in slots]


class Writer(threading.Thread):
    """Performs `writes` evenly spread over `duration` seconds; `done` is set when it finished or failed."""

    def __init__(self, db: Database, writes: Sequence[Write], duration: float) -> None:
        super().__init__(name="fault-writer", daemon=True)
        self.db = db
        self.writes = list(writes)
        self.duration = duration
        self.written = 0
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.finished_at = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        self.started_at = time.monotonic()
        step = self.duration / max(1, len(self.writes))
        try:
            for index, write in enumerate(self.writes):
                ahead = self.started_at + index * step - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
                write(self.db)
                self.written += 1
        except BaseException as exc:  # reported by finish(); the scenario fails with it
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.done.set()

    def begin(self) -> Writer:
        self.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def finish(self, timeout: float = 120.0) -> None:
        """Wait for the last write; raise if a write failed or the writes did not end in time."""
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"the writer wrote {self.written} of {len(self.writes)} in {timeout}s")
        if self.error is not None:
            raise RuntimeError(f"write {self.written + 1} of {len(self.writes)} failed: {self.error!r}")
