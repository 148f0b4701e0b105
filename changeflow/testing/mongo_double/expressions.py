"""`$expr` as mongod evaluates it in a change stream's `$match` (match.py), and BSON comparison order.

Evaluated here, with mongod's aggregation semantics for what change-stream filters use:
field paths (missing stays missing: `{$eq: ["$nope", null]}` is false), comparisons in BSON order
across types, `$and` / `$or` / `$not`, arithmetic (`$abs`, `$mod`, `$add`, `$subtract`, `$multiply`),
`$in` and `$toHashedIndexKey`. Other operators go to mongomock's expression parser.
"""

from __future__ import annotations

import datetime
import decimal
import math
import re
import uuid
from collections.abc import Callable
from typing import Any

from bson import Binary, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from mongomock.aggregate import _parse_expression

from changeflow.testing.mongo_double.errors import MongoError
from changeflow.testing.mongo_double.hashing import MISSING, to_hashed_index_key


def truthy(value: Any) -> bool:
    """mongod's coercion to bool: false, null, missing and zero are false; all else is true."""
    if value is MISSING or value is None or value is False:
        return False
    if isinstance(value, bool):
        return True
    if isinstance(value, int | float | decimal.Decimal):
        return value != 0
    if isinstance(value, Decimal128):
        return value.to_decimal() != 0
    return True


def evaluate(expr: Any, root: dict[str, Any]) -> Any:
    """The value of an aggregation expression on `root` (MISSING for a missing field)."""
    if isinstance(expr, str):
        if expr.startswith("$$"):
            name, _, path = expr[2:].partition(".")
            if name not in ("ROOT", "CURRENT"):
                raise MongoError(17276, f"Use of undefined variable: {name}")
            return _path(root, path.split(".")) if path else root
        if expr.startswith("$"):
            return _path(root, expr[1:].split("."))
        return expr
    if isinstance(expr, list):
        return [None if item is MISSING else item for item in (evaluate(e, root) for e in expr)]
    if not isinstance(expr, dict):
        return expr
    operators = [key for key in expr if key.startswith("$")]
    if not operators:
        out = {key: evaluate(value, root) for key, value in expr.items()}
        return {key: value for key, value in out.items() if value is not MISSING}
    if len(expr) != 1:
        raise MongoError(
            15983,
            "an expression specification must contain exactly one field, the name of the "
            f"expression. Found {len(expr)} fields in {expr}",
        )
    name, args = next(iter(expr.items()))
    handler = _OPERATORS.get(name)
    if handler is None:
        return _mongomock(expr, root)
    return handler(args, root)


def _path(value: Any, parts: list[str]) -> Any:
    """A field path: through arrays of documents it collects the values found (missing ones left out)."""
    for index, part in enumerate(parts):
        if isinstance(value, list):
            found = [_path(item, parts[index:]) for item in value if isinstance(item, dict)]
            return [item for item in found if item is not MISSING]
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def _mongomock(expr: dict[str, Any], root: dict[str, Any]) -> Any:
    try:
        return _parse_expression(expr, root, ignore_missing_keys=True)
    except KeyError:
        return MISSING
    except NotImplementedError as exc:
        raise MongoError(115, f"not supported by the MongoDB test server: {exc}") from exc
    except Exception as exc:
        message = str(exc)
        if "Unrecognized expression" in message:
            raise MongoError(168, message) from exc
        raise MongoError(2, f"{type(exc).__name__}: {message}") from exc


def _args(name: str, args: Any, count: int) -> list[Any]:
    items = args if isinstance(args, list) else [args]
    if len(items) != count:
        raise MongoError(
            16020, f"Expression {name} takes exactly {count} arguments. {len(items)} were passed in."
        )
    return items


def _number(value: Any) -> Any:
    """A numeric value for arithmetic (Decimal128 as Decimal), or None when it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal128):
        return value.to_decimal()
    if isinstance(value, int | float | decimal.Decimal):
        return value
    return None


def _type_name(value: Any) -> str:
    if value is MISSING:
        return "missing"
    names = [
        (bool, "bool"),
        (Int64, "long"),
        (int, "int"),
        (float, "double"),
        (Decimal128 | decimal.Decimal, "decimal"),
        (str, "string"),
        (dict, "object"),
        (list, "array"),
        (ObjectId, "objectId"),
        (datetime.datetime, "date"),
        (Timestamp, "timestamp"),
        (Binary | bytes | uuid.UUID, "binData"),
    ]
    if value is None:
        return "null"
    return next((name for kind, name in names if isinstance(value, kind)), type(value).__name__)


def _mixed(a: Any, b: Any) -> tuple[Any, Any]:
    """Two numbers in one Python type that computes exactly what mongod's widest type would."""
    if isinstance(a, decimal.Decimal) or isinstance(b, decimal.Decimal):
        return decimal.Decimal(a), decimal.Decimal(b)
    if isinstance(a, float) or isinstance(b, float):
        return float(a), float(b)
    return int(a), int(b)


def _op_abs(args: Any, root: dict[str, Any]) -> Any:
    (arg,) = _args("$abs", args, 1)
    value = evaluate(arg, root)
    if value is MISSING or value is None:
        return None
    number = _number(value)
    if number is None:
        raise MongoError(28765, f"$abs only supports numeric types, not {_type_name(value)}")
    return abs(number)


def _op_mod(args: Any, root: dict[str, Any]) -> Any:
    left, right = (evaluate(arg, root) for arg in _args("$mod", args, 2))
    if left in (None, MISSING) or right in (None, MISSING):
        return None
    a, b = _number(left), _number(right)
    if a is None or b is None:
        raise MongoError(
            16611, f"$mod only supports numeric types, not {_type_name(left)} and {_type_name(right)}"
        )
    a, b = _mixed(a, b)
    if b == 0:
        raise MongoError(16610, "can't $mod by zero")
    if isinstance(a, float):
        return math.fmod(a, b)
    if isinstance(a, decimal.Decimal):
        return a % b  # Decimal's remainder takes the dividend's sign, as mongod's
    return int(math.copysign(abs(a) % abs(b), a))  # C++ %: the dividend's sign


def _arithmetic(name: str, combine: Callable[[Any, Any], Any]) -> Callable[[Any, dict[str, Any]], Any]:
    def run(args: Any, root: dict[str, Any]) -> Any:
        values = [evaluate(arg, root) for arg in (args if isinstance(args, list) else [args])]
        if name == "$subtract":
            _args(name, args, 2)
        if any(value is None or value is MISSING for value in values):
            return None
        if any(isinstance(value, datetime.datetime) for value in values):
            return _mongomock({name: args}, root)  # date arithmetic: mongomock's
        numbers = [_number(value) for value in values]
        for value, number in zip(values, numbers, strict=True):
            if number is None:
                raise MongoError(
                    16554, f"{name} only supports numeric or date types, not {_type_name(value)}"
                )
        result = numbers[0] if numbers else 0
        for number in numbers[1:]:
            result = combine(*_mixed(result, number))
        return result

    return run


def _op_in(args: Any, root: dict[str, Any]) -> Any:
    value, array = (evaluate(arg, root) for arg in _args("$in", args, 2))
    if not isinstance(array, list):
        raise MongoError(40081, f"$in requires an array as a second argument, found: {_type_name(array)}")
    return any(compare(value, item) == 0 for item in array)


def _op_to_hashed_index_key(args: Any, root: dict[str, Any]) -> Any:
    value = evaluate(args[0] if isinstance(args, list) and len(args) == 1 else args, root)
    return to_hashed_index_key(_bson_value(value))


def _bson_value(value: Any) -> Any:
    """An evaluated value back in its BSON form (decimal.Decimal from arithmetic as Decimal128)."""
    if isinstance(value, decimal.Decimal):
        return Decimal128(value)
    if isinstance(value, dict):
        return {key: _bson_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_bson_value(item) for item in value]
    return value


def _comparison(name: str, test: Callable[[int], bool]) -> Callable[[Any, dict[str, Any]], Any]:
    def run(args: Any, root: dict[str, Any]) -> Any:
        left, right = (evaluate(arg, root) for arg in _args(name, args, 2))
        return test(compare(left, right))

    return run


def _op_cmp(args: Any, root: dict[str, Any]) -> Any:
    left, right = (evaluate(arg, root) for arg in _args("$cmp", args, 2))
    return compare(left, right)


def _logical(name: str) -> Callable[[Any, dict[str, Any]], Any]:
    def run(args: Any, root: dict[str, Any]) -> Any:
        values = (truthy(evaluate(arg, root)) for arg in (args if isinstance(args, list) else [args]))
        return all(values) if name == "$and" else any(values)

    return run


def _op_not(args: Any, root: dict[str, Any]) -> Any:
    (arg,) = _args("$not", args, 1)
    return not truthy(evaluate(arg, root))


_OPERATORS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    "$literal": lambda args, root: args,
    "$eq": _comparison("$eq", lambda c: c == 0),
    "$ne": _comparison("$ne", lambda c: c != 0),
    "$gt": _comparison("$gt", lambda c: c > 0),
    "$gte": _comparison("$gte", lambda c: c >= 0),
    "$lt": _comparison("$lt", lambda c: c < 0),
    "$lte": _comparison("$lte", lambda c: c <= 0),
    "$cmp": _op_cmp,
    "$and": _logical("$and"),
    "$or": _logical("$or"),
    "$not": _op_not,
    "$abs": _op_abs,
    "$mod": _op_mod,
    "$add": _arithmetic("$add", lambda a, b: a + b),
    "$subtract": _arithmetic("$subtract", lambda a, b: a - b),
    "$multiply": _arithmetic("$multiply", lambda a, b: a * b),
    "$in": _op_in,
    "$toHashedIndexKey": _op_to_hashed_index_key,
}


# ---------------------------------------------------------------------------------------------
# BSON order (mongod's Value::compare): canonical type first, then the value


def _rank(value: Any) -> int:
    if value is MISSING:
        return 0
    if value is None:
        return 5
    if isinstance(value, bool):
        return 40
    if isinstance(value, int | float | decimal.Decimal | Decimal128):
        return 10
    if isinstance(value, str):
        return 15
    if isinstance(value, dict):
        return 20
    if isinstance(value, list):
        return 25
    if isinstance(value, Binary | bytes | uuid.UUID):
        return 30
    if isinstance(value, ObjectId):
        return 35
    if isinstance(value, datetime.datetime):
        return 45
    if isinstance(value, Timestamp):
        return 47
    if isinstance(value, Regex | re.Pattern):
        return 50
    if isinstance(value, MinKey):
        return -1
    if isinstance(value, MaxKey):
        return 127
    raise MongoError(115, f"the MongoDB test server cannot compare a {type(value).__name__}")


def _sign(a: Any, b: Any) -> int:
    return (a > b) - (a < b)


def compare(a: Any, b: Any) -> int:
    """-1, 0 or 1 as mongod orders two values in aggregation (types first, numbers by value)."""
    rank_a, rank_b = _rank(a), _rank(b)
    if rank_a != rank_b:
        return _sign(rank_a, rank_b)
    if rank_a == 10:
        x, y = _number(a), _number(b)
        # NaN equals NaN and sorts before every other number.
        nan_x, nan_y = _is_nan(x), _is_nan(y)
        if nan_x or nan_y:
            return _sign(not nan_x, not nan_y)
        return _sign(x, y)
    if rank_a == 15:
        return _sign(a.encode(), b.encode())
    if rank_a == 20:
        for (key_a, value_a), (key_b, value_b) in zip(a.items(), b.items(), strict=False):
            order = _sign(_rank(value_a), _rank(value_b)) or _sign(key_a.encode(), key_b.encode())
            order = order or compare(value_a, value_b)
            if order:
                return order
        return _sign(len(a), len(b))
    if rank_a == 25:
        for item_a, item_b in zip(a, b, strict=False):
            order = compare(item_a, item_b)
            if order:
                return order
        return _sign(len(a), len(b))
    if rank_a == 30:
        bin_a, bin_b = _binary(a), _binary(b)
        return _sign((len(bin_a[1]), bin_a[0], bin_a[1]), (len(bin_b[1]), bin_b[0], bin_b[1]))
    if rank_a == 35:
        return _sign(a.binary, b.binary)
    if rank_a == 45:
        return _sign(_naive(a), _naive(b))
    if rank_a == 47:
        return _sign((a.time, a.inc), (b.time, b.inc))
    if rank_a == 50:
        return _sign((a.pattern, str(a.flags)), (b.pattern, str(b.flags)))
    return _sign(a, b) if rank_a == 40 else 0


def _is_nan(number: Any) -> bool:
    return isinstance(number, float | decimal.Decimal) and number != number


def _binary(value: Any) -> tuple[int, bytes]:
    if isinstance(value, uuid.UUID):
        return 4, value.bytes
    if isinstance(value, Binary):
        return value.subtype, bytes(value)
    return 0, bytes(value)


def _naive(value: datetime.datetime) -> datetime.datetime:
    if value.tzinfo is None:
        return value
    return value.astimezone(datetime.UTC).replace(tzinfo=None)
