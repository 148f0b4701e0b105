"""Backfill events on the worker side: they apply the document as it is when the task runs.

A backfill (`changeflow backfill`, changeflow/backfill/) publishes insert-shaped events marked
`changeflow_backfill: {id: <backfill id>}` for documents that already exist. Their `fullDocument` is
what the backfill read, which a live change may have superseded by the time a worker runs the task.
So the guard hands the task the document re-read now (`fresh_args`): a backfill event never applies
a state older than one a live event already applied. A document deleted since the backfill read it
is a Skip (done, nothing applied). docs/backfill.md explains the choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from changeflow.worker.errors import Skip

# The field that marks a backfill event (docs/backfill.md): `{id: <backfill id>}`, plus
# `refreshed_at` once the worker re-read the document.
MARKER = "changeflow_backfill"


def backfill_marker(payload: object) -> Mapping[str, Any] | None:
    """The backfill marker of a task payload, or None for any other payload (a live event)."""
    if not isinstance(payload, Mapping):
        return None
    marker = payload.get(MARKER)
    return marker if isinstance(marker, Mapping) else None


def fresh_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`args` unchanged, unless they are one backfill event: then that event with its document re-read.

    Raises Skip when the document no longer exists; MongoDB errors propagate (transient: retried).
    """
    if len(args) != 1 or backfill_marker(args[0]) is None:
        return args
    from changeflow.worker.mongo import get_db  # a live event never needs a client

    event = args[0]
    ns, key = event.get("ns") or {}, event.get("documentKey") or {}
    if not (ns.get("db") and ns.get("coll") and "_id" in key):
        return args  # not readable again: the task gets what the backfill read
    document = get_db().client[ns["db"]][ns["coll"]].find_one({"_id": key["_id"]})
    if document is None:
        raise Skip(f"backfill: {ns['coll']} {key['_id']!r} was deleted since the backfill read it")
    marker = {**event[MARKER], "refreshed_at": datetime.now(UTC)}
    return ({**event, "fullDocument": document, MARKER: marker},)
