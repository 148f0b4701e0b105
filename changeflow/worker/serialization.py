"""BSON in task messages: Celery's `json` serializer, extended so change events round-trip exactly.

Every value pymongo decodes from a BSON document (default codec options, plus DatetimeMS for dates
outside datetime's range) comes back from the worker's decoding equal and of the same type:
ObjectId, Decimal128, Binary (with its subtype), Timestamp, Int64, Regex, Code (with its scope),
DBRef, MinKey, MaxKey and DatetimeMS are registered with `kombu.utils.json.register_type`;
datetime, date, time, UUID, Decimal and bytes are kombu built-ins.

kombu's decoder (its `object_hook`, run on every JSON object, innermost first) reads any object
whose keys are exactly `__type__` and `__value__` as its type envelope. A document may hold such a
sub-document itself (`{"prefs": {"__type__": "x", "__value__": 1}}`): written as it is, it would fail
to decode (the message would be lost) or silently change type. So such a dict is escaped: written as
the envelope `{"__type__": "changeflow_dict", "__value__": [[key, value], ...]}`, a list of its pairs
(a list is never read as an envelope, so its values decode first, escaped or not, at any depth) that
decodes back to the plain dict, keys in their order.

Two BSON types subclass builtins that the json module encodes natively, without ever asking the
encoder's `default()` hook: Int64 (an int) and Code (a str). So the `json` serializer in kombu's
registry is re-registered with a thin encoder whose walk (`json_ready`) escapes envelope-shaped
dicts and writes Int64 and Code as their envelopes. Decoding is kombu's own.

Any other type (a Python object that is not BSON) fails with `UnserializableValueError`, which kombu
wraps in `kombu.exceptions.EncodeError` when it comes from `send_task`.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import uuid
from collections.abc import Mapping
from typing import Any

from bson import Binary, Decimal128, Int64, ObjectId, Timestamp
from bson.code import Code
from bson.datetime_ms import DatetimeMS
from bson.dbref import DBRef
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.regex import Regex
from kombu import serialization
from kombu.utils import json as kombu_json

CONTENT_TYPE = "application/json"

# Options of every MongoClient whose documents become task payloads (the listener's, reconcile's,
# the dead-letter CLI's, the workers'): MongoDB stores any 64-bit count of milliseconds as a date, and
# pymongo's default fails to decode one outside datetime's range (years 1-9999), which would stop the
# change stream at that event. With DATETIME_AUTO such a date is a DatetimeMS, the others datetimes.
MONGO_CLIENT_OPTIONS: dict[str, Any] = {"datetime_conversion": "DATETIME_AUTO"}

# kombu's envelope keys, and the marker of an escaped dict (one whose keys are exactly those two).
TYPE_KEY = "__type__"
VALUE_KEY = "__value__"
ESCAPED_DICT = "changeflow_dict"

# What a task payload may contain (besides dicts, lists and tuples), for error messages and checks.
SUPPORTED_TYPES: tuple[type, ...] = (
    str, int, float, bool, type(None), bytes, dt.datetime, dt.date, dt.time, decimal.Decimal, uuid.UUID,
    ObjectId, Decimal128, Binary, Timestamp, Int64, Regex, Code, DBRef, MinKey, MaxKey, DatetimeMS,
)  # fmt: skip


class UnserializableValueError(TypeError):
    """A task payload holds a value the task serializer cannot carry (a per-event, permanent error)."""


def is_envelope_shaped(value: Mapping[Any, Any]) -> bool:
    """Whether kombu's decoder would read `value` as its type envelope (so it must be escaped)."""
    return len(value) == 2 and TYPE_KEY in value and VALUE_KEY in value


def _binary_to_json(value: Binary) -> dict[str, Any]:
    return {"subtype": value.subtype, "base64": base64.b64encode(bytes(value)).decode("ascii")}


def _binary_from_json(value: dict[str, Any]) -> Binary:
    return Binary(base64.b64decode(value["base64"]), value["subtype"])


def _timestamp_to_json(value: Timestamp) -> dict[str, int]:
    return {"time": value.time, "inc": value.inc}


def _timestamp_from_json(value: dict[str, int]) -> Timestamp:
    return Timestamp(value["time"], value["inc"])


def _regex_to_json(value: Regex) -> dict[str, Any]:
    return {"pattern": value.pattern, "flags": value.flags}


def _regex_from_json(value: dict[str, Any]) -> Regex:
    return Regex(value["pattern"], value["flags"])


def code_to_json(value: Code) -> dict[str, Any]:
    """Code's envelope value (its scope, a document, walked like any other)."""
    return {"code": str(value), "scope": None if value.scope is None else json_ready(value.scope)}


def _code_from_json(value: dict[str, Any]) -> Code:
    return Code(value["code"], value["scope"])


def dbref_to_json(value: DBRef) -> dict[str, Any]:
    """DBRef's envelope value: its document ($ref, $id, $db if set, extra fields), walked."""
    return json_ready(value.as_doc())


def _dbref_from_json(value: dict[str, Any]) -> DBRef:
    fields = dict(value)
    return DBRef(fields.pop("$ref"), fields.pop("$id"), fields.pop("$db", None), **fields)


# Decimal128's bits (the high 64): infinity/NaN; the encoding with an implied 100 prefix; the
# coefficient (113 bits of the 128); the largest coefficient of 34 digits.
D128_SPECIAL = 0x7800000000000000
D128_OTHER_FORM = 0x6000000000000000
D128_COEFFICIENT = (1 << 113) - 1
D128_MAX_COEFFICIENT = 10**34 - 1
# The special values whose text gives their bits back (not -NaN, sNaN, nor NaNs with a payload).
D128_TEXT_SPECIALS = frozenset(Decimal128(text).bid for text in ("NaN", "Infinity", "-Infinity"))


def decimal128_has_text(value: Decimal128) -> bool:
    """Whether Decimal128(str(value)) has `value`'s bits: true of the canonical encodings.

    Other bits (a coefficient beyond 34 digits, the other form, signed or signalling NaNs, NaN
    payloads) read as another value's text; they travel as their bits (`bson_decimal128_bid`).
    """
    bits = int.from_bytes(value.bid, "little")
    high = bits >> 64
    if high & D128_SPECIAL == D128_SPECIAL:
        return value.bid in D128_TEXT_SPECIALS
    return high & D128_OTHER_FORM != D128_OTHER_FORM and bits & D128_COEFFICIENT <= D128_MAX_COEFFICIENT


def _decimal128_from_bid(value: str) -> Decimal128:
    return Decimal128.from_bid(bytes.fromhex(value))


def _escaped_dict_from_json(pairs: list[list[Any]]) -> dict[str, Any]:
    return {key: item for key, item in pairs}


def json_ready(value: Any) -> Any:
    """`value` for kombu's encoder: envelope-shaped dicts escaped, Int64 and Code as their envelopes.

    The other registered types are left to kombu's `default()` hook (DBRef's encoder walks its
    document with this function too).
    """
    # Hot path (every task message): exact type checks first.
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict or isinstance(value, dict):
        if is_envelope_shaped(value):
            return {
                TYPE_KEY: ESCAPED_DICT,
                VALUE_KEY: [[key, json_ready(item)] for key, item in value.items()],
            }
        return {key: json_ready(item) for key, item in value.items()}
    if kind is list or kind is tuple or isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if isinstance(value, Int64):
        return {TYPE_KEY: "int64", VALUE_KEY: int(value)}
    if isinstance(value, Code):
        return {TYPE_KEY: "bson_code", VALUE_KEY: code_to_json(value)}
    if isinstance(value, Decimal128) and not decimal128_has_text(value):
        return {TYPE_KEY: "bson_decimal128_bid", VALUE_KEY: value.bid.hex()}
    return value


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _find_unserializable(value: Any, path: str) -> str | None:
    """The path of the first value kombu's encoder rejects (only called after encoding failed)."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_unserializable(item, _join(path, key))
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _find_unserializable(item, f"{path}[{i}]")
            if found:
                return found
        return None
    try:
        kombu_json.dumps(value)
    except TypeError:
        return _unsupported_message(value, path)
    return None


def _unsupported_message(value: Any, path: str) -> str:
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    supported = ", ".join(t.__name__ for t in SUPPORTED_TYPES)
    return f"cannot serialize {kind} at {path or '<root>'}: task payloads support dict, list, {supported}"


def dumps(value: Any) -> str:
    """Encode like kombu's json serializer, with the walk of `json_ready`; unsupported types clearly."""
    try:
        return kombu_json.dumps(json_ready(value))
    except TypeError as exc:
        raise UnserializableValueError(_find_unserializable(value, "") or str(exc)) from None


def register_bson_types() -> None:
    """Teach Celery's `json` serializer the BSON types. Idempotent: every call registers the same."""
    kombu_json.register_type(ObjectId, "bson_objectid", str, ObjectId)
    kombu_json.register_type(Decimal128, "bson_decimal128", str, Decimal128)
    kombu_json.register_type(Binary, "bson_binary", _binary_to_json, _binary_from_json)
    kombu_json.register_type(Timestamp, "bson_timestamp", _timestamp_to_json, _timestamp_from_json)
    kombu_json.register_type(Regex, "bson_regex", _regex_to_json, _regex_from_json)
    kombu_json.register_type(DBRef, "bson_dbref", dbref_to_json, _dbref_from_json)
    kombu_json.register_type(MinKey, "bson_minkey", _none, _min_key)
    kombu_json.register_type(MaxKey, "bson_maxkey", _none, _max_key)
    kombu_json.register_type(DatetimeMS, "bson_datetime_ms", int, DatetimeMS)
    # Int64, Code and escaped dicts are written by json_ready (json never calls default() for an
    # int, a str or a dict): registered for their decoders.
    kombu_json.register_type(Int64, "int64", int, Int64)
    kombu_json.register_type(Code, "bson_code", code_to_json, _code_from_json)
    kombu_json.register_type(_EscapedDict, ESCAPED_DICT, _never, _escaped_dict_from_json)
    kombu_json.register_type(_Decimal128Bid, "bson_decimal128_bid", _never, _decimal128_from_bid)
    serialization.register(
        "json", dumps, kombu_json.loads, content_type=CONTENT_TYPE, content_encoding="utf-8"
    )


# Envelopes json_ready writes itself: kombu's register_type wants a type with the decoder; these two
# are never instantiated.
class _EscapedDict:
    pass


class _Decimal128Bid:
    pass


def _never(value: Any) -> Any:
    raise NotImplementedError("written by json_ready")


def _none(value: Any) -> None:
    return None


def _min_key(value: None) -> MinKey:
    return MinKey()


def _max_key(value: None) -> MaxKey:
    return MaxKey()


def check_serializable(payload: Any) -> None:
    """Raise UnserializableValueError when `payload` cannot be sent as a task argument."""
    dumps(payload)
