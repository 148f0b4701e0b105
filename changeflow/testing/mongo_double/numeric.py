"""Numbers of every BSON type compared by value in find filters and sorts, as mongod does.

mongod compares int, long, double and Decimal128 by value: `{a: 10}` finds `Decimal128("10")` and
`10.0`, `{a: {$gte: 10}}` orders a stored Decimal128 against the int. NaN equals NaN and is never
inside a range (`$gt`/`$lt` never match it; `$gte`/`$lte` only with NaN as the bound); sorted, it
comes before every other number. mongomock's matcher cannot order a Decimal128 (it raises) and
compares it with other numbers by type, so the collections of the shared store match through here:

- the filter's numbers (equality values, `$eq`/`$ne`/`$gt`/`$gte`/`$lt`/`$lte`, `$in`/`$nin`/`$all`
  items, through `$and`/`$or`/`$nor`/`$not`/`$elemMatch`) are wrapped, once per query, in types
  that compare with every number by value (`ValueInt`, `ValueFloat`, `ValueDecimal`): Python asks
  the wrapper when the stored side cannot answer, so equality needs no change to the documents;
- a document mongomock cannot order as stored (a Decimal128 under a range) is tested again with its
  Decimal128 values wrapped (`ValueDecimal` is a Decimal128, so `$type` still sees "decimal").

mongomock's own behaviour for every other mongomock user in the process is unchanged.
"""

from __future__ import annotations

import decimal
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

from bson import Decimal128
from mongomock.filtering import filter_applies

from changeflow.testing.mongo_double import expressions

# Operators whose argument is a value compared with the document's (wrapped); others ($type,
# $size, $mod, $exists, $regex, $expr, ...) take their argument as it is.
_VALUE_OPS = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})
_LIST_OPS = frozenset({"$in", "$nin", "$all"})
_LOGICAL = frozenset({"$and", "$or", "$nor"})
_NAN_HASH = hash("NaN")  # every NaN is equal to every other NaN in a query


def _value(x: Any) -> decimal.Decimal | float | int | None:
    """A number's value for exact comparison (None: NaN), or NotImplemented for a non-number."""
    if isinstance(x, bool):
        return NotImplemented
    if isinstance(x, ValueDecimal):
        return x.number
    if isinstance(x, Decimal128):
        number = x.to_decimal()
        return None if number.is_nan() else number
    if isinstance(x, float):
        return None if math.isnan(x) else float(x)
    if isinstance(x, decimal.Decimal):
        return None if x.is_nan() else x
    if isinstance(x, int):
        return int(x)
    return NotImplemented


def _equal(a: Any, b: Any) -> Any:
    x, y = _value(a), _value(b)
    if x is NotImplemented or y is NotImplemented:
        return NotImplemented
    if x is None or y is None:
        return x is None and y is None
    return x == y


def _order(a: Any, b: Any, test: Callable[[Any, Any], bool], nan_equal_ok: bool) -> Any:
    x, y = _value(a), _value(b)
    if x is NotImplemented or y is NotImplemented:
        return NotImplemented
    if x is None or y is None:
        # mongod: NaN is inside no range; $gte / $lte accept NaN against NaN only.
        return nan_equal_ok and x is None and y is None
    return test(x, y)


def _not_equal(a: Any, b: Any) -> Any:
    result = _equal(a, b)
    return result if result is NotImplemented else not result


class ValueInt(int):
    """An int (or long) of a filter: equal to a Decimal128 of the same value."""

    __slots__ = ()

    def __eq__(self, other: object) -> Any:
        # Stored ints and doubles take the C comparison; only a Decimal128 needs the value.
        if isinstance(other, Decimal128):
            return _equal(self, other)
        return int.__eq__(self, other)

    def __ne__(self, other: object) -> Any:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = int.__hash__


class ValueFloat(float):
    """A double of a filter: equal to a Decimal128 of the same value; a NaN equal to NaN (and
    `$gte`/`$lte` NaN accept NaN only)."""

    __slots__ = ()

    def __eq__(self, other: object) -> Any:
        if isinstance(other, Decimal128) or math.isnan(self):
            return _equal(self, other)
        return float.__eq__(self, other)

    def __ne__(self, other: object) -> Any:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = float.__hash__

    def __le__(self, other: Any) -> Any:
        if isinstance(other, Decimal128) or math.isnan(self):
            return _order(self, other, lambda x, y: x <= y, True)
        return float.__le__(self, other)

    def __ge__(self, other: Any) -> Any:
        if isinstance(other, Decimal128) or math.isnan(self):
            return _order(self, other, lambda x, y: x >= y, True)
        return float.__ge__(self, other)


class ValueDecimal(Decimal128):
    """A Decimal128 that compares with every number by value (still a Decimal128 for `$type`)."""

    __slots__ = ("number",)

    def __init__(self, value: Decimal128) -> None:
        super().__init__(value.__getstate__())
        number = value.to_decimal()
        self.number: decimal.Decimal | None = None if number.is_nan() else number

    __eq__ = _equal  # type: ignore[assignment]
    __ne__ = _not_equal  # type: ignore[assignment]

    def __hash__(self) -> int:
        return _NAN_HASH if self.number is None else hash(self.number)

    def __lt__(self, other: Any) -> Any:
        return _order(self, other, lambda x, y: x < y, False)

    def __le__(self, other: Any) -> Any:
        return _order(self, other, lambda x, y: x <= y, True)

    def __gt__(self, other: Any) -> Any:
        return _order(self, other, lambda x, y: x > y, False)

    def __ge__(self, other: Any) -> Any:
        return _order(self, other, lambda x, y: x >= y, True)


# mongomock orders only numbers.Number against numbers (it raises for a plain Decimal128).
numbers.Number.register(ValueDecimal)


def number_key(value: Any) -> Any:
    """A number (int, long, double, Decimal128) as a hashable value equal, with one hash, to every
    equal number of any type (every NaN as "NaN"); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal128):
        number = value.to_decimal()
        return "NaN" if number.is_nan() else number
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else value
    if isinstance(value, int):
        return value
    return None


def wrap(value: Any) -> Any:
    """A filter value with its numbers (also inside documents and arrays) wrapped."""
    if isinstance(value, bool | ValueInt | ValueFloat | ValueDecimal):
        return value
    if isinstance(value, int):
        return ValueInt(value)
    if isinstance(value, float):
        return ValueFloat(value)
    if isinstance(value, Decimal128):
        return ValueDecimal(value)
    if isinstance(value, dict):
        return {key: wrap(item) for key, item in value.items()}
    if isinstance(value, list):
        return [wrap(item) for item in value]
    return value


def query(spec: Any) -> Any:
    """A find filter with the numbers it compares wrapped (anything else left as it is)."""
    if not isinstance(spec, dict):
        return spec
    out: dict[str, Any] = {}
    for key, condition in spec.items():
        if key in _LOGICAL and isinstance(condition, list):
            out[key] = [query(part) for part in condition]
        elif key.startswith("$"):
            out[key] = condition  # $expr, $comment, $where, ...: as they are
        else:
            out[key] = _condition(condition)
    return out


def _condition(condition: Any) -> Any:
    if not (isinstance(condition, dict) and condition and all(k.startswith("$") for k in condition)):
        return wrap(condition)  # a value: equality (a document or an array compared whole)
    out: dict[str, Any] = {}
    for op, arg in condition.items():
        if op in _VALUE_OPS:
            out[op] = wrap(arg)
        elif op in _LIST_OPS and isinstance(arg, list):
            out[op] = [_list_item(item) for item in arg]
        elif op == "$not":
            out[op] = _condition(arg)
        elif op == "$elemMatch":
            out[op] = _elem_match(arg)
        else:
            out[op] = arg
    return out


def _list_item(item: Any) -> Any:
    if isinstance(item, dict) and set(item) == {"$elemMatch"}:  # $all: [{$elemMatch: ...}, ...]
        return {"$elemMatch": _elem_match(item["$elemMatch"])}
    return wrap(item)


def _elem_match(arg: Any) -> Any:
    # Either operators on the elements themselves ({$gte: 5}) or a query on their fields.
    if isinstance(arg, dict) and arg and all(k.startswith("$") for k in arg) and not set(arg) & _LOGICAL:
        return _condition(arg)
    return query(arg)


def document(value: Any) -> Any:
    """A stored document (a copy) with every Decimal128 wrapped, for mongomock to order."""
    if isinstance(value, Decimal128) and not isinstance(value, ValueDecimal):
        return ValueDecimal(value)
    if isinstance(value, dict):
        return {key: document(item) for key, item in value.items()}
    if isinstance(value, list):
        return [document(item) for item in value]
    return value


def matches(spec: Any, doc: Any) -> bool:
    """mongomock's filter_applies for a filter prepared by `query`, numbers compared by value."""
    try:
        return bool(filter_applies(spec, doc))
    except NotImplementedError:
        # A Decimal128 mongomock had to order: once more with the document's decimals wrapped
        # (an operator mongomock lacks raises again, and that error is the answer).
        return bool(filter_applies(spec, document(doc)))


@functools.total_ordering
class SortKey:
    """A sort key value ordered as mongod sorts (types first, numbers by value, NaN first)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SortKey) and expressions.compare(self.value, other.value) == 0

    def __lt__(self, other: SortKey) -> bool:
        return expressions.compare(self.value, other.value) < 0

    __hash__ = None  # type: ignore[assignment]
