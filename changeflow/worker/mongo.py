"""The tasks' MongoDB database, one client per process.

pymongo clients are not fork-safe: Celery's prefork children must not use a client created in the
parent. The handle is created lazily, remembers the pid that created it, and is dropped on
`worker_process_init` (connected in worker.app) and whenever the pid changed.
"""

from __future__ import annotations

import os
import threading

import pymongo
from pymongo.database import Database

from changeflow.worker.serialization import MONGO_CLIENT_OPTIONS
from changeflow.worker.settings import get_settings

_client: pymongo.MongoClient | None = None
_client_pid = 0
_lock = threading.Lock()


def get_db() -> Database:
    """The database MONGODB_DB on MONGODB_URI, for this process."""
    global _client, _client_pid
    settings = get_settings()
    with _lock:
        if _client is None or _client_pid != os.getpid():
            # A client inherited through fork is abandoned, not closed: closing it could disturb the
            # parent's sockets.
            _client = pymongo.MongoClient(
                settings.mongodb_uri, serverSelectionTimeoutMS=10_000, **MONGO_CLIENT_OPTIONS
            )
            _client_pid = os.getpid()
        return _client[settings.mongodb_db]


def reset_db() -> None:
    """Forget the client, so the next get_db() connects with the current settings."""
    global _client
    with _lock:
        if _client is not None and _client_pid == os.getpid():
            _client.close()
        _client = None
