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

The encoder is orjson with a `default` hook (`dumps`, registered as kombu's `json` serializer, so
`send_task`, task events, results and the listener's pipelined publisher all use this one function).
The hook writes every non-JSON value as kombu's encoder would (registered types in registration
order, `__json__`, bytes), so kombu's decoder reads the messages unchanged; only the spacing differs
from the json module's. orjson writes some values natively in a way kombu's format does not (NaN
and the infinities as null, UUIDs as strings, integers beyond 64 bits refused, envelope-shaped dicts
as they are, keys that are not strings refused): a payload holding any of them (`_plain` says no) is
first turned by `json_ready` into values orjson writes as the json module does (the literal text of a
float or an integer, escaped dicts, envelopes). Subclasses of str, int, float, dict, list and tuple go
to the hook (OPT_PASSTHROUGH_SUBCLASS): Int64 and Code become their envelopes, the others their base
value, as the json module writes them.

Any other type (a Python object that is not BSON) fails with `UnserializableValueError`, which kombu
wraps in `kombu.exceptions.EncodeError` when it comes from `send_task`.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import enum
import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import orjson
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


def decimal128_str(value: Decimal128) -> str:
    """str(value), as bson's Decimal128.__str__ gives it, from one Decimal parse of its bits.

    bson's to_decimal() rebuilds the coefficient byte by byte and its digits one by one, in Python
    (the most expensive leaf of a document). A finite value in the canonical encoding is
    sign * coefficient * 10**exponent, with at most 34 digits and -6176 <= exponent <= 6111: exactly
    a decimal128 context's range, so bson's context neither rounds nor clamps it, and parsing the
    same triple gives the same Decimal. NaN, infinities and the other encodings go to bson.
    """
    bits = int.from_bytes(value.bid, "little")  # the IEEE 754 BID encoding, low 64 bits first
    high = bits >> 64
    if high & D128_SPECIAL == D128_SPECIAL or high & D128_OTHER_FORM == D128_OTHER_FORM:
        return str(value)
    coefficient = bits & D128_COEFFICIENT
    if coefficient > D128_MAX_COEFFICIENT:
        return str(value)  # bson reads a too large coefficient as 0
    exponent = ((high >> 49) & 0x3FFF) - 6176
    return str(decimal.Decimal(f"{'-' if high >> 63 else ''}{coefficient}E{exponent}"))


# -- the encoder ------------------------------------------------------------------------------------
# Non-JSON values go to orjson's default hook; datetimes and subclasses of builtins too (orjson would
# write them its own way); dataclasses too (the json module refuses them).
ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
)
# The integers orjson writes itself; the json module writes any.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_NON_FINITE = {
    "nan": orjson.Fragment(b"NaN"),
    "inf": orjson.Fragment(b"Infinity"),
    "-inf": orjson.Fragment(b"-Infinity"),
}
_NON_FINITE_KEYS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def dumps(value: Any) -> bytes:
    """Encode like kombu's json serializer (its envelopes, BSON types registered), with orjson."""
    if len(kombu_json._encoders) != _hooks_registry[0]:
        _hooks.clear()  # a type was registered since the hooks were made: make them again
        _hooks_registry[0] = len(kombu_json._encoders)
    try:
        if _plain(value):
            try:
                text = orjson.dumps(value, default=_default, option=ORJSON_OPTIONS)
            except TypeError:
                pass  # a key that is not a string, an integer beyond 64 bits, ...: json_ready decides
            else:
                # The hook writes its envelopes with a space after '"__type__":', orjson writes a
                # dict's own keys without: a document's dict with a "__type__" key (maybe shaped
                # like an envelope, to be escaped) makes the counts differ.
                if text.count(b'"__type__":') == text.count(b'"__type__": '):
                    return text
        return orjson.dumps(json_ready(value), default=_default, option=ORJSON_OPTIONS)
    except TypeError as exc:  # orjson.JSONEncodeError is one
        raise UnserializableValueError(_find_unserializable(value, "") or str(exc)) from None


# What orjson (with the hook) writes as kombu's format wants it, whatever the value.
_PLAIN_LEAVES = frozenset(
    {str, int, bool, type(None), ObjectId, Decimal128, Timestamp, Binary, Int64, Regex, Code, DBRef,
     MinKey, MaxKey, DatetimeMS, dt.datetime, dt.date, dt.time, decimal.Decimal, bytes}
)  # fmt: skip


def _plain(value: Any) -> bool:
    """False when `value` holds what orjson writes natively but not as the json module does: NaN
    and the infinities (as null), UUIDs (as strings), Enum members (as their values)."""
    kind = type(value)
    if kind is dict:
        items: Any = value.values()
    elif kind is list or kind is tuple:
        items = value
    elif kind is float:
        return math.isfinite(value)
    else:
        return not issubclass(kind, uuid.UUID | enum.Enum)
    for item in items:  # noqa: SIM110 (a loop: all() of a generator is slower, on every message)
        if type(item) not in _PLAIN_LEAVES and not _plain(item):
            return False
    return True


def json_ready(value: Any) -> Any:
    """`value` for orjson with the hook: what it would write differently from kombu's format, made ready.

    Envelope-shaped dicts escaped; keys as the json module turns them into strings; NaN, the
    infinities and integers beyond 64 bits as their literal text; every other non-JSON value (UUID,
    subclasses, what orjson would write natively but the json module refuses) as the hook writes it.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        return value if _INT_MIN <= value <= _INT_MAX else orjson.Fragment(int.__repr__(value).encode())
    if kind is float:
        return value if math.isfinite(value) else _NON_FINITE[repr(value)]
    if isinstance(value, dict):  # subclasses through their items(), as the json module
        if is_envelope_shaped(value):
            return {
                TYPE_KEY: ESCAPED_DICT,
                VALUE_KEY: [[key, json_ready(item)] for key, item in value.items()],
            }
        return {_json_key(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if kind is orjson.Fragment:
        return value  # made ready already (a registered encoder's result walked again)
    return _default(value)


def _json_key(key: Any) -> str:
    """A dict key as the json module writes it (str, float, bool, None, int), or its TypeError."""
    if isinstance(key, str):
        return str.__str__(key)
    if isinstance(key, float):
        return float.__repr__(key) if math.isfinite(key) else _NON_FINITE_KEYS[repr(float(key))]
    if key is True or key is False or key is None:
        return {True: "true", False: "false", None: "null"}[key]
    if isinstance(key, int):
        return int.__repr__(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


# type -> what the hook returns for a value of it; made on first sight of the type.
_hooks: dict[type, Callable[[Any], Any]] = {}
_hooks_registry = [0]  # len(kombu's registry) the hooks were made from


def _default(value: Any) -> Any:
    """orjson's default hook: `value` as kombu's JSONEncoder.default would write it."""
    kind = type(value)
    hook = _hooks.get(kind)
    if hook is None:
        hook = _hooks[kind] = _hook_for(kind)
    return hook(value)


def _hook_for(kind: type) -> Callable[[Any], Any]:
    # Subclasses of builtins: the json module writes them as their base type without asking the
    # hook, except Int64 and Code (json_ready wrote them as their envelopes, and still does).
    if issubclass(kind, Int64):
        return _int64_json
    if issubclass(kind, Code):
        return lambda value: _envelope_text("bson_code", code_to_json(value))
    if issubclass(kind, str):
        return str.__str__
    if issubclass(kind, int):
        return lambda value: orjson.Fragment(int.__repr__(value).encode())
    if issubclass(kind, float):
        return lambda value: json_ready(float.__float__(value))
    if issubclass(kind, dict | list | tuple):
        return json_ready
    if kind is Decimal128:
        return _decimal128_json
    if issubclass(kind, Decimal128):
        return lambda value: (
            _envelope_text("bson_decimal128", str(value))
            if decimal128_has_text(value)
            else _envelope_text("bson_decimal128_bid", value.bid.hex())
        )
    # kombu's JSONEncoder.default, in its order (kombu/utils/json.py).
    if getattr(kind, "__json__", None) is not None:
        return lambda value: value.__json__()
    if kombu_json.textual_types and issubclass(kind, kombu_json.textual_types):
        return str
    for registered, (marker, encode) in kombu_json._encoders.items():
        if issubclass(kind, registered):
            if marker is None:
                return encode
            return _envelope(marker, encode)
    if issubclass(kind, bytes):
        return _bytes_json
    return _refuse


def _envelope(marker: str, encode: Callable[[Any], Any]) -> Callable[[Any], orjson.Fragment]:
    """kombu's {"__type__": marker, "__value__": encode(value)}, spelled as dumps() recognizes it."""
    return lambda value: _envelope_text(marker, encode(value))


def _envelope_text(marker: str, encoded: Any) -> orjson.Fragment:
    # An encoder's result is written as it is, as kombu's encoder writes it (Code's and DBRef's walk
    # the document they hold with json_ready themselves).
    return orjson.Fragment(
        b'{"__type__": '
        + orjson.dumps(marker)
        + b', "__value__": '
        + orjson.dumps(encoded, default=_default, option=ORJSON_OPTIONS)
        + b"}"
    )


def _int64_json(value: Int64) -> orjson.Fragment:
    return orjson.Fragment(b'{"__type__": "int64", "__value__": %d}' % value)


def _decimal128_json(value: Decimal128) -> orjson.Fragment:
    """Decimal128's envelope: its text, or its bits when the text would not give them back."""
    if decimal128_has_text(value):
        return _envelope_text("bson_decimal128", decimal128_str(value))
    return _envelope_text("bson_decimal128_bid", value.bid.hex())


def _bytes_json(value: bytes) -> orjson.Fragment:
    try:
        return _envelope_text("bytes", value.decode("utf-8"))
    except UnicodeDecodeError:
        return _envelope_text("base64", base64.b64encode(value).decode("utf-8"))


def _refuse(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _find_unserializable(value: Any, path: str) -> str | None:
    """The path of the first value the encoder rejects (only called after encoding failed)."""
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
        orjson.dumps(json_ready(value), default=_default, option=ORJSON_OPTIONS)
    except TypeError:
        return _unsupported_message(value, path)
    return None


def _unsupported_message(value: Any, path: str) -> str:
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    supported = ", ".join(t.__name__ for t in SUPPORTED_TYPES)
    return f"cannot serialize {kind} at {path or '<root>'}: task payloads support dict, list, {supported}"


def register_bson_types() -> None:
    """Teach Celery's `json` serializer the BSON types. Idempotent: every call registers the same."""
    kombu_json.register_type(ObjectId, "bson_objectid", str, ObjectId)
    kombu_json.register_type(Decimal128, "bson_decimal128", decimal128_str, Decimal128)
    kombu_json.register_type(Binary, "bson_binary", _binary_to_json, _binary_from_json)
    kombu_json.register_type(Timestamp, "bson_timestamp", _timestamp_to_json, _timestamp_from_json)
    kombu_json.register_type(Regex, "bson_regex", _regex_to_json, _regex_from_json)
    kombu_json.register_type(DBRef, "bson_dbref", dbref_to_json, _dbref_from_json)
    kombu_json.register_type(MinKey, "bson_minkey", _none, _min_key)
    kombu_json.register_type(MaxKey, "bson_maxkey", _none, _max_key)
    kombu_json.register_type(DatetimeMS, "bson_datetime_ms", int, DatetimeMS)
    # Int64 and Code are written by the hook before kombu's registry is asked (as subclasses of int and
    # str); escaped dicts and Decimal128's bits by json_ready and the hook: registered for their decoders.
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
