"""Pre-images for the routes that ask for them (`@app.on(..., pre_images=True)`).

MongoDB keeps the document as it was before an update, replace or delete only for collections with
`changeStreamPreAndPostImages` enabled, and a change stream shows it (`fullDocumentBeforeChange`)
only when opened with `fullDocumentBeforeChange: whenAvailable` (or `required`). So when any route
needs them the listener does both: it enables them on each such collection when it becomes active
(`enable`, one `collMod`, or `create` for a collection that does not exist yet), and opens its stream
with `whenAvailable` (STREAM_OPTION). Not `required`: the stream watches the whole database, and one
change without a pre-image (images were off when it happened, or a collection no route asked them
for) would stop it; a missing pre-image is null and the task decides what that means.

A MongoDB that refuses (the listener's user lacks the collMod action, a server without the option)
is a configuration error: `PreImagesRefused`, whose message names the collection, the command and
the way out. Network errors propagate as they are: the listener retries them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from pymongo.database import Database
from pymongo.errors import OperationFailure

from changeflow.listener.routes import Route

log = logging.getLogger(__name__)

STREAM_OPTION = "whenAvailable"  # the change stream's fullDocumentBeforeChange
NAMESPACE_NOT_FOUND = 26
NAMESPACE_EXISTS = 48
_ENABLED = {"enabled": True}


class PreImagesRefused(Exception):
    """MongoDB refused to enable pre-images on a collection a route needs them for."""


def collections_needing_pre_images(routes: Iterable[Route]) -> dict[str, list[str]]:
    """Collection -> the tasks whose routes on it ask for pre-images, in route order."""
    needed: dict[str, list[str]] = {}
    for route in routes:
        if route.pre_images:
            tasks = needed.setdefault(route.collection, [])
            tasks.extend(name for name in route.tasks if name not in tasks)
    return needed


def refusal(db_name: str, collection: str, tasks: Iterable[str], exc: OperationFailure) -> PreImagesRefused:
    """The error that says what failed, why, and what the operator can do."""
    why = (exc.details or {}).get("errmsg") or str(exc)
    return PreImagesRefused(
        f"MongoDB refused to enable change stream pre-images on {db_name}.{collection} "
        f"(collMod {collection} changeStreamPreAndPostImages {{enabled: true}}), which the route(s) of "
        f"{', '.join(tasks)} need: {why} (code {exc.code}). Grant the listener's user the collMod "
        f"action on {db_name}.{collection}, or enable them once as an administrator: "
        f'db.runCommand({{collMod: "{collection}", changeStreamPreAndPostImages: {{enabled: true}}}}) '
        "(MongoDB 6.0+)"
    )


def enable_one(db: Database, collection: str) -> None:
    """collMod the collection, creating it with the option when it does not exist yet."""
    try:
        db.command("collMod", collection, changeStreamPreAndPostImages=_ENABLED)
        return
    except OperationFailure as exc:
        if exc.code != NAMESPACE_NOT_FOUND:
            raise
    try:
        db.command("create", collection, changeStreamPreAndPostImages=_ENABLED)
    except OperationFailure as exc:
        if exc.code != NAMESPACE_EXISTS:
            raise
        # The application created it meanwhile: collMod finds it now.
        db.command("collMod", collection, changeStreamPreAndPostImages=_ENABLED)


def enable(db: Database, needed: dict[str, list[str]], retryable: Callable[[OperationFailure], bool]) -> None:
    """Enable pre-images on every collection of `needed`; one INFO line for all of them.

    PreImagesRefused when MongoDB refuses one with a server error `retryable` says retrying cannot
    fix; the other errors (network, a stepping-down primary) propagate for the caller to retry.
    """
    for collection, tasks in needed.items():
        try:
            enable_one(db, collection)
        except OperationFailure as exc:
            if retryable(exc):
                raise
            raise refusal(db.name, collection, tasks, exc) from exc
    if needed:
        log.info(
            "change stream pre-images enabled on %s (collMod changeStreamPreAndPostImages), for %s",
            ", ".join(f"{db.name}.{collection}" for collection in needed),
            ", ".join(dict.fromkeys(name for tasks in needed.values() for name in tasks)),
        )
