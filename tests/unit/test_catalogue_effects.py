"""The pure parts of the seed guide's catalogue: the event_log entry, the event_store entry and the
cache keys a change makes stale, each built from a change event as the listener publishes it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from bson import ObjectId, Timestamp

from changeflow.worker.errors import PermanentTaskError
from tasks.cache import stale_keys
from tasks.event_log import registration_entry
from tasks.event_store import store_entry

WALL = dt.datetime(2026, 11, 23, 19, 38, 14, 123000)
CLUSTER = Timestamp(1_763_926_694, 7)


def change(
    coll: str, operation: str, key: Any, token: str = "82691F0A2600000007", **fields: Any
) -> dict[str, Any]:
    return {
        "_id": {"_data": token},
        "operationType": operation,
        "ns": {"db": "app", "coll": coll},
        "documentKey": {"_id": key},
        "clusterTime": CLUSTER,
        "wallTime": WALL,
        **fields,
    }


def description(updated: dict[str, Any], removed: list[str] | None = None) -> dict[str, Any]:
    return {"updatedFields": updated, "removedFields": removed or [], "truncatedArrays": []}


# -- event_log -----------------------------------------------------------------------------------


def test_a_registration_entry_names_the_user_and_the_email() -> None:
    oid = ObjectId()
    user = {"_id": oid, "email": "ada@example.test", "name": "Ada"}
    assert registration_entry(change("users", "insert", oid, fullDocument=user)) == {
        "type": "user_registered",
        "user_id": oid,
        "metadata": {"email": "ada@example.test"},
        "created_at": WALL.replace(tzinfo=dt.UTC),  # when the user was written, not when the task ran
    }


def test_a_user_without_an_email_is_logged_with_email_none() -> None:
    oid = ObjectId()
    entry = registration_entry(change("users", "insert", oid, fullDocument={"_id": oid, "name": "No Email"}))
    assert entry["metadata"] == {"email": None}
    assert entry["user_id"] == oid


def test_the_registration_time_falls_back_to_the_cluster_time() -> None:
    event = change("users", "insert", 7, fullDocument={"_id": 7, "email": "x@example.test"})
    del event["wallTime"]
    assert registration_entry(event)["created_at"] == CLUSTER.as_datetime()


# -- event_store ---------------------------------------------------------------------------------


def test_an_insert_stores_the_new_document_under_its_event_id() -> None:
    oid = ObjectId()
    order = {"_id": oid, "status": "pending"}
    entry = store_entry(change("orders", "insert", oid, fullDocument=order))
    assert entry == {
        "_id": "82691F0A2600000007",
        "eventId": "82691F0A2600000007",
        "eventType": "insert",
        "aggregateType": "orders",
        "aggregateId": oid,
        "eventData": order,
        "timestamp": CLUSTER,
    }
    assert isinstance(entry["aggregateId"], ObjectId) and isinstance(entry["timestamp"], Timestamp)


def test_an_update_stores_the_change_not_the_looked_up_document() -> None:
    oid = ObjectId()
    update = description({"status": "shipped"}, removed=["note"])
    entry = store_entry(
        change(
            "orders",
            "update",
            oid,
            updateDescription=update,
            fullDocument={"_id": oid, "status": "delivered"},
        )
    )
    assert (entry["eventType"], entry["eventData"]) == ("update", update)


def test_a_replace_stores_the_replacement_and_a_delete_no_data() -> None:
    replaced = store_entry(change("users", "replace", 5, fullDocument={"_id": 5, "email": "n@example.test"}))
    assert replaced["eventData"] == {"_id": 5, "email": "n@example.test"}
    deleted = store_entry(change("users", "delete", 5, fullDocumentBeforeChange={"_id": 5}))
    assert deleted["eventType"] == "delete" and "eventData" not in deleted
    assert deleted["aggregateId"] == 5


def test_a_reconciled_insert_is_stored_without_a_cluster_time() -> None:
    event = change("users", "insert", 4, token="reconcile:users:4", fullDocument={"_id": 4})
    del event["clusterTime"]
    entry = store_entry(event)
    assert (entry["eventId"], entry["timestamp"], entry["reconciled"]) == ("reconcile:users:4", None, True)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"_id": {"nodata": 1}}, "resume token"),
        ({"operationType": "drop"}, "operationType 'drop'"),
        ({"clusterTime": 1_763_926_694}, "clusterTime"),
    ],
)
def test_an_event_without_what_the_entry_needs_is_a_permanent_error(
    fields: dict[str, Any], says: str
) -> None:
    with pytest.raises(PermanentTaskError, match=says):
        store_entry({**change("users", "insert", 1, fullDocument={"_id": 1}), **fields})


# -- cache keys ----------------------------------------------------------------------------------


def test_an_email_change_makes_both_emails_keys_stale() -> None:
    oid = ObjectId()
    event = change(
        "users",
        "update",
        oid,
        updateDescription=description({"email": "new@example.test"}),
        fullDocument={"_id": oid, "email": "new@example.test"},
        fullDocumentBeforeChange={"_id": oid, "email": "old@example.test"},
    )
    stale = stale_keys(event)
    assert stale.keys == (
        f"user:{oid}",
        f"user_profile:{oid}",
        "user_by_email:old@example.test",
        "user_by_email:new@example.test",
    )
    assert str(oid) in stale.keys[0] and len(str(oid)) == 24
    assert not stale.old_email_unknown


def test_another_update_makes_the_current_emails_key_stale_too() -> None:
    event = change(
        "users",
        "update",
        42,
        updateDescription=description({"name": "Ada L."}),
        fullDocument={"_id": 42, "email": "ada@example.test", "name": "Ada L."},
    )
    stale = stale_keys(event)  # no pre-image needed: the email did not change
    assert stale.keys == ("user:42", "user_profile:42", "user_by_email:ada@example.test")
    assert not stale.old_email_unknown


def test_a_delete_makes_the_old_emails_key_stale() -> None:
    event = change(
        "users", "delete", "u-1", fullDocumentBeforeChange={"_id": "u-1", "email": "gone@example.test"}
    )
    assert stale_keys(event).keys == ("user:u-1", "user_profile:u-1", "user_by_email:gone@example.test")


def test_a_replace_makes_the_old_and_the_new_emails_keys_stale() -> None:
    event = change(
        "users",
        "replace",
        3,
        fullDocument={"_id": 3, "email": "b@example.test"},
        fullDocumentBeforeChange={"_id": 3, "email": "a@example.test"},
    )
    assert stale_keys(event).keys[2:] == ("user_by_email:a@example.test", "user_by_email:b@example.test")


@pytest.mark.parametrize(
    ("operation", "fields", "email_keys"),
    [
        (
            "update",
            {"updateDescription": description({"email": "new@example.test"}), "fullDocument": None},
            ("user_by_email:new@example.test",),
        ),
        ("update", {"updateDescription": description({}, removed=["email"]), "fullDocument": {"_id": 9}}, ()),
        ("update", {"updateDescription": description({"name": "x"}), "fullDocument": None}, ()),
        (
            "replace",
            {"fullDocument": {"_id": 9, "email": "r@example.test"}},
            ("user_by_email:r@example.test",),
        ),
        ("delete", {}, ()),
    ],
)
def test_without_a_pre_image_the_id_keys_and_the_new_email_go_and_the_old_email_is_unknown(
    operation: str, fields: dict[str, Any], email_keys: tuple[str, ...]
) -> None:
    # As a stream opened with whenAvailable delivers it for a change made while images were off.
    stale = stale_keys(change("users", operation, 9, fullDocumentBeforeChange=None, **fields))
    assert stale.keys == ("user:9", "user_profile:9", *email_keys)
    assert stale.old_email_unknown


def test_an_email_that_is_not_a_string_has_no_key() -> None:
    event = change("users", "delete", 1, fullDocumentBeforeChange={"_id": 1, "email": None})
    stale = stale_keys(event)
    assert stale.keys == ("user:1", "user_profile:1")
    assert not stale.old_email_unknown  # the pre-image says it: the user had no email
