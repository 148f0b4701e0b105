"""Where a backfill is, as a MongoDB query (pure): documents after the last `_id` done, in `_id` order.

Each batch is `find(page_query(filter, last_id)).sort("_id", 1).limit(batch)`: a range on the `_id`
index, never `skip`. A plain `{_id: {$gt: last}}` would only match `_id`s of the same BSON type
(MongoDB's query comparison is type-bracketed), and a collection may mix them (numbers, strings,
ObjectIds): the query also takes every `_id` whose type sorts after the last one's, in MongoDB's
sort order, so the walk goes on across types and still never returns a document twice.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from bson import Binary, Decimal128, Int64, MaxKey, MinKey, ObjectId
from bson.datetime_ms import DatetimeMS

# MongoDB's comparison/sort order of the BSON types an `_id` can have (never an array, a regex or
# undefined; a Timestamp, MongoDB's internal type, is refused), each with a query for every `_id` of
# that type: `$type` where the MongoDB test server has it, equality for the one-value types.
TYPE_ORDER: tuple[tuple[str, dict[str, Any]], ...] = (
    ("minKey", {"_id": MinKey()}),
    ("null", {"_id": None}),
    ("number", {"_id": {"$type": "number"}}),
    ("string", {"_id": {"$type": "string"}}),  # and the deprecated symbol, which pymongo reads as str
    ("object", {"_id": {"$type": "object"}}),
    ("binData", {"_id": {"$type": "binData"}}),
    ("objectId", {"_id": {"$type": "objectId"}}),
    ("bool", {"_id": {"$type": "bool"}}),
    ("date", {"_id": {"$type": "date"}}),
    ("maxKey", {"_id": MaxKey()}),
)
RANKS = {name: rank for rank, (name, _) in enumerate(TYPE_ORDER)}


def type_rank(value: Any) -> int:
    """The rank of `value`'s BSON type in TYPE_ORDER; ValueError for a type no `_id` can page by."""
    if value is None:
        return RANKS["null"]
    for name, types in _PYTHON_TYPES:
        if isinstance(value, types):
            return RANKS[name]
    raise ValueError(f"cannot page by an _id of type {type(value).__name__}")


# Python types as pymongo decodes each BSON type (bool before number: a bool is an int in Python).
_PYTHON_TYPES: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("minKey", MinKey),
    ("maxKey", MaxKey),
    ("bool", bool),
    ("number", (int, float, Int64, Decimal128, Decimal)),
    ("string", str),
    ("object", Mapping),
    ("binData", (bytes, Binary, uuid.UUID)),
    ("objectId", ObjectId),
    ("date", (dt.datetime, DatetimeMS)),
)


def after(last_id: Any) -> dict[str, Any]:
    """Every `_id` greater than `last_id` in MongoDB's order: same type and greater, or a later type."""
    later = [dict(query) for _, query in TYPE_ORDER[type_rank(last_id) + 1 :]]
    return {"$or": [{"_id": {"$gt": last_id}}, *later]}


def page_query(query: Mapping[str, Any], last_id: Any, *, started: bool) -> dict[str, Any]:
    """The query of the next batch: `query`'s documents after `last_id` (`started`: one was done)."""
    if not started:
        return dict(query)
    if not query:
        return after(last_id)
    return {"$and": [dict(query), after(last_id)]}
