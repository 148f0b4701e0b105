"""The task payload: a change event trimmed to the fields tasks may rely on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The contract with the tasks (docs/decisions.md). Everything else in a change event (lsid,
# txnNumber, collectionUUID, ...) is MongoDB's business, not the tasks'.
PAYLOAD_FIELDS: tuple[str, ...] = (
    "_id",
    "operationType",
    "ns",
    "documentKey",
    "fullDocument",
    "updateDescription",
    "clusterTime",
    "wallTime",
    # Only when a route asked for pre-images (Route.pre_images): the document before the change.
    "fullDocumentBeforeChange",
)


def task_payload(event: Mapping[str, Any]) -> dict[str, Any]:
    """The payload for `event`: the contract's fields that are present, BSON values untouched.

    A field the event lacks stays absent (an insert has no updateDescription); a field that is
    present with a null value (fullDocument of an update whose document is already deleted) is kept.
    """
    return {field: event[field] for field in PAYLOAD_FIELDS if field in event}
