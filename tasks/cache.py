"""Cache invalidation: a changed or deleted user's keys leave the application's cache (CACHE_REDIS_URL).

    user:<id>  user_profile:<id>  user_by_email:<email>    (<id>: str(_id), 24 hex for an ObjectId)

On every update, replace or delete of a user the id keys go, and so does `user_by_email:<email>` of
every address the change shows: the one before it (the pre-image, `fullDocumentBeforeChange`) and
the one after it (the new email of an update, the replacement's, the document now). A cached lookup by
email holds the user as it was, so it is stale after any change, not only an email change; an extra
delete costs a cache miss, a missing one serves stale data.

The route asks for pre-images (`pre_images=True`): the listener enables them on `users` when it
starts and opens its stream with `fullDocumentBeforeChange: whenAvailable`. A change made while they
were off has none: the id keys and the new email's key are still deleted, and a warning says the old
email's key could not be known. Deleting keys is idempotent, so a redelivery does no harm.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from changeflow.worker.settings import Settings, get_settings
from tasks.app import app

log = logging.getLogger(__name__)

EMAIL = "email"


@dataclass(frozen=True)
class Invalidation:
    """The cache keys one users change makes stale, and whether the old email's key is unknown."""

    keys: tuple[str, ...]
    old_email_unknown: bool


def _email(document: object) -> str | None:
    value = document.get(EMAIL) if isinstance(document, Mapping) else None
    return value if isinstance(value, str) and value else None


def _email_changed(event: Mapping[str, Any]) -> bool:
    description = event.get("updateDescription") or {}
    removed = description.get("removedFields") or []
    return EMAIL in (description.get("updatedFields") or {}) or EMAIL in removed


def stale_keys(event: Mapping[str, Any]) -> Invalidation:
    """The keys a users update, replace or delete makes stale (see the module docstring)."""
    operation = event.get("operationType")
    user_id = str(event["documentKey"]["_id"])
    before = event.get("fullDocumentBeforeChange")
    after = event.get("fullDocument")  # the replacement, or the update's lookup (null once deleted)
    emails = [_email(before)]
    if operation == "update":
        updated = (event.get("updateDescription") or {}).get("updatedFields") or {}
        emails.append(_email(updated))
    if operation in ("update", "replace"):
        emails.append(_email(after))
    keys = [f"user:{user_id}", f"user_profile:{user_id}"]
    keys += [f"user_by_email:{email}" for email in dict.fromkeys(emails) if email is not None]
    # Without a pre-image the old email is known only from an update that left it as it is.
    known = isinstance(before, Mapping) or (
        operation == "update" and not _email_changed(event) and isinstance(after, Mapping)
    )
    return Invalidation(tuple(keys), old_email_unknown=not known)


_client: redis.Redis | None = None
_client_for: tuple[int, Settings] | None = None
_lock = threading.Lock()


def cache_client() -> redis.Redis:
    """The cache's client for this process and these settings (TLS and Sentinel as for every Redis)."""
    global _client, _client_for
    settings = get_settings()
    with _lock:
        if _client is None or _client_for != (os.getpid(), settings):
            if _client is not None and _client_for is not None and _client_for[0] == os.getpid():
                _client.close()  # settings changed (tests); a client inherited through fork is left alone
            target = settings.redis_target("cache_redis_url")
            _client = target.client(socket_timeout=10, socket_connect_timeout=5)
            _client_for = (os.getpid(), settings)
        return _client


@app.on("users", ["update", "replace", "delete"], pre_images=True, name="tasks.invalidate_user_cache")
def invalidate_user_cache(event: dict[str, Any]) -> None:
    """Delete the cache keys of the changed user."""
    stale = stale_keys(event)
    if stale.old_email_unknown:
        log.warning(
            "user %s (%s): the change has no pre-image (pre-images were off when it happened?): the "
            "user_by_email key of its old email could not be known and was not deleted",
            event["documentKey"]["_id"], event.get("operationType"),
        )  # fmt: skip
    cache_client().delete(*stale.keys)
