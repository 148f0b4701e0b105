"""Per-key ordering, the pure parts: ordered_by paths, keys of events, the messages' orders."""

from __future__ import annotations

from typing import Any

import pytest
from bson import Int64, ObjectId

from changeflow import Changeflow, FieldChanged
from changeflow.listener.ordering import DOCUMENT_KEY, order_for, order_key, ordering_path
from changeflow.listener.publish import messages_for
from changeflow.listener.routes import Route
from changeflow.worker.ordering import Order

OID = ObjectId("6b0499edc0443d30f7072bde")


def event(data: str = "8200000001", **fields: Any) -> dict[str, Any]:
    base = {
        "_id": {"_data": data},
        "operationType": "update",
        "ns": {"db": "d", "coll": "orders"},
        "documentKey": {"_id": OID},
        "fullDocument": {"_id": OID, "user_id": 7, "status": "paid"},
        "updateDescription": {"updatedFields": {"status": "paid"}, "removedFields": []},
    }
    base.update(fields)
    return base


def test_ordered_by_true_means_the_document_key() -> None:
    assert ordering_path(True) == DOCUMENT_KEY == "documentKey"
    assert ordering_path(None) is None and ordering_path(False) is None
    assert ordering_path("fullDocument.user_id") == "fullDocument.user_id"


@pytest.mark.parametrize(
    "bad", ["", "_id", "lsid.id", "fullDocument..x", "fullDocument.$x", 3, ["documentKey"]]
)
def test_ordered_by_must_be_a_payload_field_path(bad: object) -> None:
    with pytest.raises(ValueError, match="ordered_by"):
        ordering_path(bad)


def test_the_document_key_gives_one_key_per_document() -> None:
    key = order_key(event(), "documentKey")
    assert key == 'documentKey={"_id": {"$oid": "6b0499edc0443d30f7072bde"}}'
    assert order_key(event("8200000002"), "documentKey") == key  # another event, the same document
    other = event(documentKey={"_id": ObjectId()})
    assert order_key(other, "documentKey") != key


def test_a_field_path_keys_by_its_value_with_its_bson_type() -> None:
    assert order_key(event(), "fullDocument.user_id") == 'fullDocument.user_id={"$numberInt": "7"}'
    by_int64 = event(fullDocument={"user_id": Int64(7)})
    assert order_key(by_int64, "fullDocument.user_id") == 'fullDocument.user_id={"$numberLong": "7"}'
    nested = event(fullDocument={"customer": {"id": "c1"}})
    assert order_key(nested, "fullDocument.customer.id") == 'fullDocument.customer.id="c1"'


@pytest.mark.parametrize(
    "changed",
    [
        {"fullDocument": None},  # an update whose document is gone before the lookup
        {"fullDocument": {"_id": OID}},  # the field is missing
        {"fullDocument": {"_id": OID, "user_id": None}},  # null: no key either
    ],
)
def test_a_missing_or_null_value_has_no_key(changed: dict[str, Any]) -> None:
    assert order_key(event(**changed), "fullDocument.user_id") is None
    assert order_for(event(**changed), "fullDocument.user_id") == Order("", "8200000001")


def test_a_document_value_is_a_key_too() -> None:
    got = order_key(event(fullDocument={"user_id": {"x": 1}}), "fullDocument.user_id")
    assert got == 'fullDocument.user_id={"x": {"$numberInt": "1"}}'


def test_messages_of_ordered_tasks_carry_their_order() -> None:
    routes = (
        Route("orders", "update", ["t.ordered"], when=FieldChanged("status"), ordered_by=True),
        Route("orders", "update", ["t.plain"]),
        Route("orders", "update", ["t.by_user"], ordered_by="fullDocument.user_id"),
    )
    messages = {m.task_name: m for m in messages_for(event("82AB"), routes)}
    assert messages["t.ordered"].order == Order(order_key(event(), "documentKey") or "?", "82AB")
    assert messages["t.ordered"].ordered_by == "documentKey"
    assert messages["t.plain"].order is None
    assert messages["t.by_user"].order == Order('fullDocument.user_id={"$numberInt": "7"}', "82AB")
    # reconcile's synthetic events have no place in the stream's order
    assert all(m.order is None for m in messages_for(event("82AB"), routes, ordered=False))


def test_an_app_declares_ordering_per_task() -> None:
    app = Changeflow("ordering_test", package="tests.unit")

    @app.on("orders", "update", ordered_by=True, name="t.notify")
    def notify(event: dict[str, Any]) -> None: ...

    app.route("orders", "insert", "t.notify")  # another route to it: the task stays ordered
    assert [r.ordered_by for r in app.routes] == ["documentKey", None]
    inserted = event(operationType="insert")
    assert messages_for(inserted, app.routes)[0].order is not None
    with pytest.raises(ValueError, match="ordered_by 'documentKey' already"):
        app.route("orders", "delete", "t.notify", ordered_by="fullDocument.user_id")
    with pytest.raises(ValueError, match="must start with a task payload field"):
        app.on("orders", "update", ordered_by="lsid", name="t.other")(lambda e: None)
    assert "t.other" not in app.tasks  # a bad ordering leaves no task behind
