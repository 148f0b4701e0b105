"""Indexes the tasks' own collections need, created on first use in each process.

`create_index` is idempotent but a round trip: done once per (client, database, index), before the
first write that relies on it (a unique index must exist before two workers race to insert).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database

# Per client (a new client after fork or new settings asks again), the indexes known to exist.
_created: weakref.WeakKeyDictionary[MongoClient, set[str]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def ensure_index(db: Database, collection: str, keys: list[tuple[str, int]], **options: Any) -> None:
    """Create the index on `db[collection]` unless it was created through this client already."""
    key = repr((db.name, collection, keys, sorted(options.items())))
    with _lock:
        if key in _created.get(db.client, set()):
            return
    db[collection].create_index(keys, **options)
    with _lock:
        _created.setdefault(db.client, set()).add(key)
