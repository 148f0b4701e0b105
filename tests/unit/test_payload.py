"""The task payload: a change event trimmed to the contract's fields, BSON types intact."""

from __future__ import annotations

import datetime as dt
from typing import Any

from bson import Decimal128, Int64, ObjectId, Timestamp

from changeflow.listener.payload import PAYLOAD_FIELDS, task_payload


def full_event() -> dict[str, Any]:
    oid = ObjectId()
    return {
        "_id": {"_data": "8263A0"},
        "operationType": "update",
        "clusterTime": Timestamp(1_700_000_000, 3),
        "wallTime": dt.datetime(2026, 11, 23, 12, 0, 0),
        "ns": {"db": "app", "coll": "orders"},
        "documentKey": {"_id": oid},
        "fullDocument": {"_id": oid, "status": "shipped", "total": Decimal128("9.90"), "n": Int64(2)},
        "updateDescription": {
            "updatedFields": {"status": "shipped"},
            "removedFields": [],
            "truncatedArrays": [],
        },
        "txnNumber": Int64(4),
        "lsid": {"id": "x"},
        "collectionUUID": "uuid",
        "fullDocumentBeforeChange": {"_id": oid},
    }


def test_keeps_exactly_the_contract_fields() -> None:
    change = full_event()
    payload = task_payload(change)
    assert list(payload) == list(PAYLOAD_FIELDS)
    assert all(payload[name] is change[name] for name in PAYLOAD_FIELDS)  # values untouched


def test_bson_values_keep_their_types() -> None:
    payload = task_payload(full_event())
    assert isinstance(payload["clusterTime"], Timestamp)
    assert isinstance(payload["documentKey"]["_id"], ObjectId)
    assert isinstance(payload["fullDocument"]["total"], Decimal128)
    assert isinstance(payload["fullDocument"]["n"], Int64)


def test_absent_fields_stay_absent() -> None:
    insert = {
        "_id": {"_data": "82"},
        "operationType": "insert",
        "ns": {"db": "app", "coll": "users"},
        "documentKey": {"_id": 1},
        "fullDocument": {"_id": 1},
    }
    assert task_payload(insert) == insert
    assert "updateDescription" not in task_payload(insert)


def test_null_full_document_is_kept() -> None:
    # An update looked up after the document was deleted: fullDocument is present and null.
    change = {**full_event(), "fullDocument": None}
    assert task_payload(change)["fullDocument"] is None


def test_event_is_not_modified() -> None:
    change = full_event()
    before = dict(change)
    task_payload(change)
    assert change == before
