"""Task payloads round-trip exactly through the serializer Celery uses (kombu's registry, 'json')."""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import enum
import re
import uuid
from typing import Any

import pytest
from bson import Binary, Decimal128, Int64, ObjectId, Timestamp
from bson.code import Code
from bson.datetime_ms import DatetimeMS
from bson.dbref import DBRef
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.regex import Regex
from kombu.exceptions import EncodeError
from kombu.serialization import dumps, loads

from changeflow.worker.serialization import UnserializableValueError, check_serializable, register_bson_types

register_bson_types()  # as creating an app does


def round_trip(value: Any) -> Any:
    content_type, encoding, body = dumps(value, serializer="json")
    assert content_type == "application/json"
    return loads(body, content_type, encoding)


def assert_identical(actual: Any, expected: Any) -> None:
    """Equal, and of exactly the same type at every level (Int64 is not int, Binary is not bytes)."""
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_identical(actual[key], expected[key])
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_identical(a, e)
    elif isinstance(expected, Binary):
        assert (actual.subtype, bytes(actual)) == (expected.subtype, bytes(expected))
    else:
        assert actual == expected


VALUES: dict[str, Any] = {
    "objectid": ObjectId("65f0c0ffee0123456789abcd"),
    "decimal128": Decimal128("1234.5600"),
    "decimal128_negative_zero": Decimal128("-0"),
    "decimal128_nan": Decimal128("NaN"),
    "binary_generic": Binary(b"\x00\x01\xfe\xff", 0),
    "binary_uuid": Binary(uuid.UUID("12345678-1234-5678-1234-567812345678").bytes, 4),
    "binary_user_defined": Binary(b"custom", 0x80),
    "bytes_utf8": b"plain text",
    "bytes_binary": b"\x80\x81\xff",
    "bytes_empty": b"",
    "timestamp": Timestamp(1_763_900_000, 7),
    "int64": Int64(2**62),
    "int64_negative": Int64(-5),
    "int": 42,
    "float": 1.5,
    "bool": True,
    "none": None,
    "str": "héllo ✓",
    "datetime": dt.datetime(2026, 11, 23, 19, 38, 14, 123000),
    "datetime_aware": dt.datetime(2026, 11, 23, 19, 38, 14, 123000, tzinfo=dt.UTC),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": decimal.Decimal("3.140"),
}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_each_type_round_trips_exactly(name: str) -> None:
    value = VALUES[name]
    assert_identical(round_trip(value), value)


def test_nested_in_a_change_event_round_trips_exactly() -> None:
    event = {
        "_id": {"_data": "8263F0A1B2000000012B022C0100296E5A1004"},
        "operationType": "update",
        "ns": {"db": "shop", "coll": "orders"},
        "documentKey": {"_id": ObjectId("65f0c0ffee0123456789abcd")},
        "updateDescription": {
            "updatedFields": {"status": "shipped", "total": Decimal128("19.99"), "n": Int64(3)},
            "removedFields": [],
            "truncatedArrays": [],
        },
        "fullDocument": {"items": [{"sku": Binary(b"\x01\x02", 0x80), "qty": Int64(2)}, [b"\xff", 1]]},
        "clusterTime": Timestamp(1_763_900_000, 1),
        "wallTime": dt.datetime(2026, 11, 23, 19, 38, 14, 123000),
    }
    assert_identical(round_trip(event), event)


def test_celery_message_body_shape_round_trips() -> None:
    # What Celery serializes for send_task(name, args=[payload]): (args, kwargs, embed); tuples become lists.
    body = ([{"n": Int64(1), "id": ObjectId("65f0c0ffee0123456789abcd")}], {}, {"callbacks": None})
    assert_identical(round_trip(body), [body[0], {}, {"callbacks": None}])


@pytest.mark.parametrize(
    "value",
    [
        Regex("^a", "i"),
        Code("function() {}"),
        Code("x", {"a": Int64(1), "e": {"__type__": "x", "__value__": 1}}),
        MinKey(),
        MaxKey(),
        DBRef("c", Int64(1), "db", extra={"n": Int64(2)}),
        DatetimeMS(-(2**62)),
        Decimal128("-NaN"),
        {"__type__": "datetime", "__value__": "2026-01-01T00:00:00"},
    ],
    ids=[
        "regex",
        "code",
        "code_with_scope",
        "minkey",
        "maxkey",
        "dbref",
        "datetime_ms",
        "decimal128_bits",
        "envelope",
    ],
)
def test_the_other_bson_values_round_trip_exactly(value: Any) -> None:
    # Values pymongo decodes besides the ones above (tests/unit/test_payload_round_trip.py has them all).
    decoded = round_trip({"fullDocument": {"field": [1, value]}})["fullDocument"]["field"][1]
    if isinstance(value, Code | DBRef | Decimal128):
        assert repr(decoded) == repr(value) and type(decoded) is type(value)
        if isinstance(value, Decimal128):
            assert decoded.bid == value.bid
    else:
        assert_identical(decoded, value)


@pytest.mark.parametrize(
    "value", [re.compile("^a"), complex(1, 2), {1, 2}], ids=["re_pattern", "complex", "set"]
)
def test_values_that_are_not_bson_fail_clearly(value: Any) -> None:
    with pytest.raises(EncodeError) as raised:
        dumps({"fullDocument": {"field": [1, value]}}, serializer="json")
    message = str(raised.value)
    assert type(value).__name__ in message
    assert "fullDocument.field[1]" in message  # says where the value is
    with pytest.raises(UnserializableValueError):
        check_serializable({"x": value})


def test_registration_is_idempotent() -> None:
    register_bson_types()
    register_bson_types()
    value = {"n": Int64(7), "b": Binary(b"x", 5)}
    assert_identical(round_trip(value), value)


# -- what orjson writes differently from the json module, written as kombu's format wants it -------
class _Color(enum.IntEnum):
    RED = 1


class _Name(str):
    pass


class _Plain(enum.Enum):
    A = 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"x": float("nan")}, None),  # orjson alone writes null
        ([float("inf"), float("-inf"), -0.0, 1e16, 1e-7], None),
        ({"big": 2**70, "neg": -(2**64)}, None),  # beyond orjson's 64 bits
        ({1: "a", 2.5: "b", None: "c", False: "d"}, {"1": "a", "2.5": "b", "null": "c", "false": "d"}),
        ({"u": uuid.UUID(int=7)}, None),  # orjson alone writes a plain string
        ({"c": _Color.RED, "n": _Name("x")}, {"c": 1, "n": "x"}),  # as the json module writes them
        (collections.OrderedDict([("b", 1), ("a", Int64(2))]), None),
        ({"doc": {"__value__": 1, "__type__": "int64"}}, None),  # a document's own envelope-shaped dict
        ({"doc": {"__type__": "only the type key"}}, None),
    ],
    ids=["nan", "floats", "big-ints", "non-str-keys", "uuid", "int-and-str-subclasses", "ordered-dict",
         "envelope-shaped", "type-key"],
)  # fmt: skip
def test_orjson_differences_are_written_as_kombus_format(value: Any, expected: Any) -> None:
    decoded = round_trip(value)
    want = value if expected is None else expected
    if isinstance(want, collections.OrderedDict):
        want = dict(want)
    assert repr(decoded) == repr(want)
    assert type(decoded) is type(want)


def test_an_enum_member_is_refused_as_the_json_module_refuses_it() -> None:
    with pytest.raises(UnserializableValueError, match="_Plain at e"):
        check_serializable({"e": _Plain.A})


def test_the_hooks_envelopes_and_a_documents_own_keys_are_told_apart() -> None:
    from changeflow.worker.serialization import dumps as encode

    text = encode({"o": ObjectId("65f0c0ffee0123456789abcd"), "d": {"__type__": "x", "__value__": 1}})
    assert b'{"__type__": "bson_objectid", "__value__": "65f0c0ffee0123456789abcd"}' in text
    assert b'"__type__":"changeflow_dict"' in text  # escaped, through json_ready
