"""Open cursors: find/aggregate results not yet fetched, and change streams."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Any

from changeflow.testing.mongo_double.changestreams import ChangeStream

DEFAULT_FIRST_BATCH = 101


@dataclass
class ResultCursor:
    cursor_id: int
    ns: str
    docs: list[dict[str, Any]]
    pos: int = 0

    def take(self, batch_size: int | None) -> list[dict[str, Any]]:
        end = len(self.docs) if not batch_size or batch_size <= 0 else self.pos + batch_size
        batch = self.docs[self.pos : end]
        self.pos += len(batch)
        return batch

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.docs)


Cursor = ResultCursor | ChangeStream


class CursorTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cursors: dict[int, Cursor] = {}

    def new_id(self) -> int:
        # Non-zero, positive Int64 as mongod hands out; random so stale ids from a restart are unknown.
        return secrets.randbits(62) + 1

    def add(self, cursor: Cursor) -> None:
        with self._lock:
            self._cursors[cursor.cursor_id] = cursor

    def get(self, cursor_id: int) -> Cursor | None:
        with self._lock:
            return self._cursors.get(cursor_id)

    def remove(self, cursor_id: int) -> bool:
        with self._lock:
            return self._cursors.pop(cursor_id, None) is not None
