"""BSON comparison order for the types mongomock cannot sort by itself.

mongomock's sort (and range query) ranks each value by its BSON type (`_get_compare_type`), and raises
for a type it does not know, bson.Timestamp among them. MongoDB ranks Timestamps right after dates
and orders them by (time, inc), which is what `Timestamp.__lt__` does, so only the rank is missing.
Installed when a server is created, not on import.
"""

from __future__ import annotations

from typing import Any

import mongomock.filtering
from bson import Timestamp

# mongomock's ranks: datetime 45, regular expressions 50; MongoDB puts Timestamp between them.
TIMESTAMP_RANK = 47


def install() -> None:
    """Teach mongomock to rank Timestamps (idempotent)."""
    original = mongomock.filtering._get_compare_type
    if getattr(original, "_knows_timestamps", False):
        return

    def compare_type(value: Any) -> int:
        if isinstance(value, Timestamp):
            return TIMESTAMP_RANK
        return int(original(value))

    compare_type._knows_timestamps = True  # type: ignore[attr-defined]
    mongomock.filtering._get_compare_type = compare_type
