"""Every BSON document MongoDB accepts reaches a task exactly as stored: equal, and of the same types.

Each generated document is first stored and read back as BSON (bson.encode, then bson.decode with the
listener's client options): what MongoDB would store and a change stream would hand the listener.
The change event holding it then goes through the real listener encodings (the pipelined publisher's
body encoder and Celery's send_task through kombu) and the worker's decoding (kombu's loads with the
registered types), and must come out identical: same values, same types (Int64 is not int, 1 is not
1.0 nor True), same key order.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import bson
import orjson
import pytest
from bson import Binary, Decimal128, Int64, ObjectId, Timestamp
from bson.code import Code
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from bson.dbref import DBRef
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.regex import Regex
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection
from kombu.serialization import dumps, loads

from changeflow.listener.payload import task_payload
from changeflow.listener.pipelined import PipelinedPublisher
from changeflow.listener.publish import CeleryPublisher, Message
from changeflow.worker import serialization
from changeflow.worker.serialization import MONGO_CLIENT_OPTIONS
from tests.unit.test_pipelined_publisher import FakeRedis, make_app

# What the listener's MongoClient decodes with (its options on top of pymongo's defaults).
STORED = CodecOptions(
    datetime_conversion=DatetimeConversion[MONGO_CLIENT_OPTIONS["datetime_conversion"]],
)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TASK = "tasks.send_welcome_email"


# -- strict equality --------------------------------------------------------------------------------


def assert_identical(actual: Any, expected: Any, path: str = "") -> None:
    """Equal and of exactly the same type at every level, dict keys in the same order.

    Python's == says 1 == 1.0 == True == Int64(1), Binary(b"x", 0) == b"x" is False but bytes and
    Binary are both bytes, NaN != NaN, 0.0 == -0.0: so types are compared first, then values in the
    terms of each type.
    """
    where = path or "<root>"
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} {actual!r} != {expected!r}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_identical(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{where}: {len(actual)} items, not {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(a, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        same = (math.isnan(actual) and math.isnan(expected)) or (
            actual == expected and math.copysign(1, actual) == math.copysign(1, expected)
        )
        assert same, f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, Code):
        assert str(actual) == str(expected), f"{where}: code {str(actual)!r} != {str(expected)!r}"
        assert_identical(actual.scope, expected.scope, f"{path}.<scope>")
    elif isinstance(expected, DBRef):
        assert_identical(dict(actual.as_doc()), dict(expected.as_doc()), f"{path}.<dbref>")
    elif isinstance(expected, Regex):
        assert_identical(actual.pattern, expected.pattern, f"{path}.<pattern>")
        assert_identical(actual.flags, expected.flags, f"{path}.<flags>")
    elif isinstance(expected, Binary):
        assert (actual.subtype, bytes(actual)) == (expected.subtype, bytes(expected)), where
    elif isinstance(expected, Decimal128):
        assert actual.bid == expected.bid, f"{where}: {actual!r} != {expected!r} (bits)"
    elif isinstance(expected, dt.datetime):
        assert actual == expected and actual.utcoffset() == expected.utcoffset(), where
        assert (actual.tzinfo is None) == (expected.tzinfo is None), where
    elif isinstance(expected, Timestamp):
        assert (actual.time, actual.inc) == (expected.time, expected.inc), where
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize(
    ("actual", "expected"),
    [
        (1, 1.0),
        (1, True),
        (Int64(1), 1),
        (b"x", Binary(b"x", 0)),
        (Binary(b"x", 0x80), Binary(b"x", 0x81)),
        (0.0, -0.0),
        (float("nan"), 1.0),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ({"a": [1, {"b": Int64(2)}]}, {"a": [1, {"b": 2}]}),
        (Code("f", {"x": 1}), Code("f", {"x": Int64(1)})),
        (Code("f"), Code("f", {})),
        (DBRef("c", 1), DBRef("c", Int64(1))),
        (DBRef("c", 1, x=1), DBRef("c", 1, x=1.0)),
        (Regex("a", 2), Regex("a", 0)),
        (Decimal128("NaN"), Decimal128("-NaN")),
        (Decimal128("1.0"), Decimal128("1.00")),
        (dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 1, tzinfo=dt.UTC)),
        (MinKey(), MaxKey()),
        (DatetimeMS(1), dt.datetime(1970, 1, 1, 0, 0, 0, 1000)),
    ],
)
def test_the_equality_helper_tells_apart_what_plain_equality_does_not(actual: Any, expected: Any) -> None:
    with pytest.raises(AssertionError):
        assert_identical(actual, expected)


# -- the paths under test ---------------------------------------------------------------------------


def event_for(document: dict[str, Any]) -> dict[str, Any]:
    """An insert event of `document` as the listener reads it: decoded from its BSON."""
    raw = bson.encode(
        {
            "_id": {"_data": "8263F0A1B2000000012B022C0100296E5A1004"},
            "operationType": "insert",
            "clusterTime": Timestamp(1_763_900_000, 1),
            "wallTime": dt.datetime(2026, 11, 23, 19, 38, 14, 123000),
            "ns": {"db": "changeflow", "coll": "users"},
            "documentKey": {"_id": document["_id"]},
            "fullDocument": document,
        }
    )
    return bson.decode(raw, codec_options=STORED)


def through_pipelined(payload: dict[str, Any]) -> Any:
    """The payload as a worker decodes what PipelinedPublisher pushed to Redis."""
    client = FakeRedis()
    publisher = PipelinedPublisher(make_app(sent_events=False), client=client)  # type: ignore[arg-type]
    assert publisher.publish([Message(TASK, "k", payload)]) == []
    (commands,) = client.round_trips
    ((_, _, envelope_text),) = commands  # one LPUSH of one message
    envelope = json.loads(envelope_text)
    body = base64.b64decode(envelope["body"])
    args, kwargs, _ = loads(body, envelope["content-type"], envelope["content-encoding"])
    assert kwargs == {}
    return args[0]


@pytest.fixture(scope="module")
def memory_app() -> Iterator[Celery]:
    """A Celery app configured as worker.app's, on kombu's in-memory transport."""
    app = make_app(sent_events=False)
    app.conf.broker_url = "memory://"
    yield app
    app.close()


def through_celery(app: Celery, payload: dict[str, Any]) -> Any:
    """The payload as a worker decodes what CeleryPublisher (send_task) sent."""
    assert CeleryPublisher(app).publish([Message(TASK, "k", payload)]) == []
    with Connection("memory://") as connection:
        message = connection.default_channel.basic_get(app.conf.task_default_queue, no_ack=True)
        assert message is not None, "send_task sent nothing"
        args, kwargs, _ = message.decode()  # what the worker's Request does with the message
    assert kwargs == {}
    return args[0]


def assert_round_trips(document: dict[str, Any], app: Celery) -> None:
    event = event_for(document)
    payload = task_payload(event)
    # The registered serializer is changeflow's orjson encoder; orjson as it is (what dumps() uses when
    # nothing needs json_ready) and through json_ready decode to the same payload.
    body = ([payload], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    text = dumps(body, serializer="json")[2]
    assert text == serialization.dumps(body)
    ready = orjson.dumps(
        serialization.json_ready(body), default=serialization._default, option=serialization.ORJSON_OPTIONS
    )
    assert_identical(loads(ready, "application/json", "utf-8")[0][0], payload)
    assert_identical(through_pipelined(payload), payload)
    assert_identical(through_celery(app, payload), payload)


# -- BSON documents ---------------------------------------------------------------------------------

# Field names: kombu's envelope keys and our escape marker, $-prefixed (DBRef's among them), dotted,
# empty, and any other text (BSON field names cannot hold NUL).
ODD_KEYS = ["__type__", "__value__", "changeflow_dict", "$ref", "$id", "$db", "$set", "a.b", ".", "", "_id"]
keys = st.one_of(
    st.sampled_from(ODD_KEYS),
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8),
)
# Markers kombu or changeflow decode, so that an unescaped envelope would change type or fail.
MARKERS = ["datetime", "int64", "bytes", "base64", "bson_objectid", "bson_code", "changeflow_dict", "x"]

large_text = st.builds(
    lambda piece, times: piece * times, st.text(min_size=1, max_size=4), st.integers(1, 300_000)
)
binary_subtypes = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 0x80, 0xFF])
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31 - 1),  # int32 -> int
    st.integers(INT64_MIN, INT64_MAX).map(Int64),  # int64 -> Int64, whatever its size
    st.integers(2**31, INT64_MAX),  # a Python int stored as int64 comes back an Int64
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(blacklist_categories=("Cs",))),
    large_text,
    st.binary(max_size=64),  # subtype 0 -> bytes
    st.builds(Binary, st.binary(max_size=64), binary_subtypes),
    st.binary(min_size=16, max_size=16).map(lambda b: Binary(b, 4)),  # UUID-ish, as pymongo reads it
    st.binary(min_size=12, max_size=12).map(ObjectId),
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59)),
    st.integers(INT64_MIN, INT64_MAX).map(DatetimeMS),  # dates outside datetime's years too
    st.binary(min_size=16, max_size=16).map(Decimal128.from_bid),  # any bits, NaN payloads included
    st.decimals(allow_nan=False, places=None)
    .filter(lambda d: len(d.as_tuple().digits) <= 34 and -6143 <= d.adjusted() <= 6144)
    .map(Decimal128),
    st.builds(Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(
        Regex,
        st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
        st.sampled_from(["", "i", "imsux", "lmx"]),
    ),
    st.builds(Code, st.text(st.characters(blacklist_categories=("Cs",)))),
    st.just(MinKey()),
    st.just(MaxKey()),
)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
        # Exactly kombu's envelope keys, in either order, with a marker or any value.
        st.builds(
            lambda t, v: {"__type__": t, "__value__": v},
            st.one_of(st.sampled_from(MARKERS), children),
            children,
        ),
        st.builds(
            lambda t, v: {"__value__": v, "__type__": t},
            st.one_of(st.sampled_from(MARKERS), children),
            children,
        ),
        st.builds(Code, st.text(max_size=8), st.dictionaries(keys, children, max_size=3)),  # code with scope
        st.builds(
            lambda c, i, extra: {"$ref": c, "$id": i, **extra},
            st.text(max_size=5),
            children,
            st.dictionaries(keys.map(lambda k: "k" + k), children, max_size=2),
        ),  # a DBRef once read
    )


values = st.recursive(leaves, containers, max_leaves=24)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    """A value nested up to MongoDB's limit of 100 levels (the event adds two), in dicts, lists and
    envelope-shaped dicts."""
    value = draw(leaves)
    for _ in range(draw(st.integers(1, 97))):
        value = draw(
            st.sampled_from(
                [
                    {"d": value},
                    [value],
                    {"__type__": "int64", "__value__": value},
                    {"__value__": value, "__type__": "x"},
                ]
            )
        )
    return value


documents = st.builds(
    lambda oid, fields: {"_id": oid, **fields},
    st.one_of(
        st.binary(min_size=12, max_size=12).map(ObjectId),
        st.integers(INT64_MIN, INT64_MAX),
        st.text(max_size=8),
        values,
    ),
    st.dictionaries(keys.filter(lambda k: k != "_id"), st.one_of(values, deep()), max_size=6),
).filter(lambda doc: not isinstance(doc["_id"], list))  # MongoDB refuses an array _id


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(documents)
def test_every_bson_document_reaches_the_task_exactly_as_stored(
    memory_app: Celery, document: dict[str, Any]
) -> None:
    assert_round_trips(document, memory_app)


@pytest.mark.parametrize(
    "document",
    [
        {"prefs": {"__type__": "x", "__value__": 1}},  # kombu: unsupported type, the message was lost
        {"prefs": {"__type__": "datetime", "__value__": "2026-01-02T03:04:05"}},  # became a datetime
        {"prefs": {"__value__": "2026-01-02", "__type__": "date"}},
        {"n": {"__type__": "int64", "__value__": 5}},  # became an Int64
        {"own": {"__type__": "changeflow_dict", "__value__": [["__type__", 1], ["__value__", 2]]}},
        {
            "nested": {
                "__type__": {"__type__": "x", "__value__": {"__type__": "y", "__value__": None}},
                "__value__": [{"__type__": "bytes", "__value__": "a"}],
            }
        },
        {"$set": {"a.b": {"": 1, "$x": Int64(2)}}, "a.b.c": 1.0, "": True},
        {
            "code": Code("f(x)", {"x": {"__type__": "x", "__value__": Int64(1)}}),
            "ref": {"$ref": "c", "$id": {"__type__": "x", "__value__": 1}, "$db": "d", "extra": Int64(3)},
        },
        {
            "regex": Regex("^a.b$", "imsux"),
            "keys": [MinKey(), MaxKey()],
            "ts": Timestamp(1, 2),
            "big": Int64(2**63 - 1),
        },
        {"dates": [DatetimeMS(-(2**62)), DatetimeMS(2**62), dt.datetime(1, 1, 1), dt.datetime(9999, 12, 31)]},
        {
            "dec": [
                Decimal128("-NaN"),
                Decimal128("sNaN"),
                Decimal128.from_bid(b"\xff" * 16),
                Decimal128("1.10"),
            ]
        },
        {"large": "x" * 4_000_000, "bin": Binary(b"\x00" * 1_000_000, 0x80)},
    ],
    ids=[
        "unknown-marker",
        "datetime-marker",
        "date-marker-reversed",
        "int64-marker",
        "own-marker",
        "nested-envelopes",
        "dollar-dotted-empty",
        "code-dbref-with-envelopes",
        "regex-keys-ts",
        "dates-out-of-range",
        "decimal-bits",
        "large",
    ],
)
def test_odd_documents_reach_the_task_exactly_as_stored(memory_app: Celery, document: dict[str, Any]) -> None:
    assert_round_trips({"_id": ObjectId(), **document}, memory_app)


def test_an_odd_document_is_not_read_by_kombu_as_its_envelope() -> None:
    # The property above, seen from the wire: the worker's own decoder gets a plain dict back.
    payload = task_payload(
        event_for({"_id": 1, "prefs": {"__type__": "uuid", "__value__": {"hex": "0" * 32}}})
    )
    decoded = through_pipelined(payload)
    assert decoded["fullDocument"]["prefs"] == {"__type__": "uuid", "__value__": {"hex": "0" * 32}}
    assert not isinstance(decoded["fullDocument"]["prefs"], uuid.UUID)
