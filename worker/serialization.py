"""BSON types in task messages: Celery's `json` serializer, extended so change events round-trip exactly.

ObjectId, Decimal128, Binary (with its subtype), Timestamp and Int64 are registered with
`kombu.utils.json.register_type`; datetime, date, time, UUID, Decimal and bytes are kombu built-ins.

Two BSON types subclass builtins that the json module encodes natively, without ever asking the
encoder's `default()` hook: Int64 (an int) and Code (a str). So the `json` serializer in kombu's
registry is re-registered with a thin encoder that first marks Int64 values (keeping the type) and
rejects Code (which would otherwise silently turn into a plain string). Decoding is kombu's own.

Any other type (Regex, Code, MinKey, MaxKey, DBRef, ...) fails with `UnserializableValueError`,
which kombu wraps in `kombu.exceptions.EncodeError` when it comes from `send_task`.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import uuid
from typing import Any

from bson import Binary, Decimal128, Int64, ObjectId, Timestamp
from bson.code import Code
from kombu import serialization
from kombu.utils import json as kombu_json

CONTENT_TYPE = "application/json"

# What a task payload may contain (besides dicts, lists and tuples), for error messages and checks.
SUPPORTED_TYPES: tuple[type, ...] = (
    str, int, float, bool, type(None), bytes, dt.datetime, dt.date, dt.time, decimal.Decimal, uuid.UUID,
    ObjectId, Decimal128, Binary, Timestamp, Int64,
)  # fmt: skip


class UnserializableValueError(TypeError):
    """A task payload holds a value the task serializer cannot carry (a per-event, permanent error)."""


def _binary_to_json(value: Binary) -> dict[str, Any]:
    return {"subtype": value.subtype, "base64": base64.b64encode(bytes(value)).decode("ascii")}


def _binary_from_json(value: dict[str, Any]) -> Binary:
    return Binary(base64.b64decode(value["base64"]), value["subtype"])


def _timestamp_to_json(value: Timestamp) -> dict[str, int]:
    return {"time": value.time, "inc": value.inc}


def _timestamp_from_json(value: dict[str, int]) -> Timestamp:
    return Timestamp(value["time"], value["inc"])


class _Unsupported(Exception):
    """Internal: a Code value was found; dumps() then looks for its path (only on this rare path)."""


def _mark_builtin_subclasses(value: Any) -> Any:
    """Copy of `value` with Int64 wrapped in kombu's type envelope; Code rejected (see module doc)."""
    # Hot path (every task message): exact type checks first, no path bookkeeping.
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict or isinstance(value, dict):
        return {key: _mark_builtin_subclasses(item) for key, item in value.items()}
    if kind is list or kind is tuple or isinstance(value, list | tuple):
        return [_mark_builtin_subclasses(item) for item in value]
    if isinstance(value, Int64):
        return {"__type__": "int64", "__value__": int(value)}
    if isinstance(value, Code):
        raise _Unsupported
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
    if isinstance(value, Code):
        return _unsupported_message(value, path)
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
    """Encode like kombu's json serializer, keeping Int64 and rejecting unsupported types clearly."""
    try:
        return kombu_json.dumps(_mark_builtin_subclasses(value))
    except (_Unsupported, TypeError) as exc:
        raise UnserializableValueError(_find_unserializable(value, "") or str(exc)) from None


def register_bson_types() -> None:
    """Teach Celery's `json` serializer the BSON types. Idempotent: every call registers the same."""
    kombu_json.register_type(ObjectId, "bson_objectid", str, ObjectId)
    kombu_json.register_type(Decimal128, "bson_decimal128", str, Decimal128)
    kombu_json.register_type(Binary, "bson_binary", _binary_to_json, _binary_from_json)
    kombu_json.register_type(Timestamp, "bson_timestamp", _timestamp_to_json, _timestamp_from_json)
    # Encoding of Int64 happens in dumps() (json never calls default() for an int); this is the decoder.
    kombu_json.register_type(Int64, "int64", int, Int64)
    serialization.register(
        "json", dumps, kombu_json.loads, content_type=CONTENT_TYPE, content_encoding="utf-8"
    )


def check_serializable(payload: Any) -> None:
    """Raise UnserializableValueError when `payload` cannot be sent as a task argument."""
    dumps(payload)
