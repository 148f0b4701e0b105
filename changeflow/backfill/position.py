"""Where a backfill is, as a MongoDB query (pure): documents after the last `_id` done, in `_id` order.

Each batch is `find(page_query(filter, last_id)).sort("_id", 1).limit(batch)`: a range on the `_id`
index, never `skip`. A plain `{_id: {$gt: last}}` would only match `_id`s of the same BSON type
(MongoDB's query comparison is type-bracketed), and a collection may mix them (numbers, strings,
ObjectIds): the query also takes every `_id` whose type sorts after the last one's, in MongoDB's
sort order, so the walk goes on across types and still never returns a document twice.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.datetime_ms import DatetimeMS

# MongoDB's comparison/sort order of BSON types, one group per rank, as `$type` aliases.
TYPE_ORDER: tuple[tuple[str, ...], ...] = (
    ("minKey",),
    ("null",),
    ("int", "long", "double", "decimal"),
    ("symbol", "string"),
    ("object",),
    ("array",),
    ("binData",),
    ("objectId",),
    ("bool",),
    ("date",),
    ("timestamp",),
    ("regex",),
    ("maxKey",),
)


def type_rank(value: Any) -> int:
    """The rank of `value`'s BSON type in TYPE_ORDER; ValueError for a type no `_id` can page by."""
    checks: tuple[tuple[int, type | tuple[type, ...]], ...] = (
        (0, MinKey),
        (12, MaxKey),
        (8, bool),  # before int: bool is an int in Python
        (2, (int, float, Int64, Decimal128, Decimal)),
        (3, str),
        (4, Mapping),
        (6, (bytes, Binary, uuid.UUID)),
        (7, ObjectId),
        (9, (dt.datetime, DatetimeMS)),
        (10, Timestamp),
        (11, (Regex, re.Pattern)),
    )
    if value is None:
        return 1
    if isinstance(value, Code):
        raise ValueError("cannot page by an _id of type Code")
    for rank, types in checks:
        if isinstance(value, types):
            return rank
    raise ValueError(f"cannot page by an _id of type {type(value).__name__}")


def after(last_id: Any) -> dict[str, Any]:
    """Every `_id` greater than `last_id` in MongoDB's order: same type and greater, or a later type."""
    later = [{"_id": {"$type": alias}} for group in TYPE_ORDER[type_rank(last_id) + 1 :] for alias in group]
    return {"$or": [{"_id": {"$gt": last_id}}, *later]}


def page_query(query: Mapping[str, Any], last_id: Any, *, started: bool) -> dict[str, Any]:
    """The query of the next batch: `query`'s documents after `last_id` (`started`: one was done)."""
    if not started:
        return dict(query)
    if not query:
        return after(last_id)
    return {"$and": [dict(query), after(last_id)]}
