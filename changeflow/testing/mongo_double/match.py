"""`$match` as mongod evaluates it on a change event: query operators and `$expr`.

Query operators are the find filters' (numeric.py: mongomock's matcher with numbers of every type
compared by value); `$expr`, anywhere in `$and` / `$or` / `$nor`, is evaluated by expressions.py.
`compile_match(query)` prepares a query once (per cursor) and returns the per-event predicate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mongomock.helpers import patch_datetime_awareness_in_document

from changeflow.testing.mongo_double import numeric
from changeflow.testing.mongo_double.errors import MongoError
from changeflow.testing.mongo_double.expressions import evaluate, truthy

Predicate = Callable[[dict[str, Any]], bool]
_LOGICAL = ("$and", "$or", "$nor")


def compile_match(query: Any) -> Predicate:
    """The predicate of one `$match` stage's query, prepared once."""
    if not isinstance(query, Mapping):
        raise MongoError(15959, "the match filter must be an expression in an object")
    spec = numeric.query(patch_datetime_awareness_in_document(dict(query)))
    expr = _has_expr(spec)

    def predicate(doc: dict[str, Any]) -> bool:
        prepared = patch_datetime_awareness_in_document(doc)
        if expr:
            return _matches(spec, doc, prepared)
        return numeric.matches(spec, prepared)

    return predicate


def _has_expr(spec: Any) -> bool:
    if isinstance(spec, dict):
        return any(key == "$expr" or (key in _LOGICAL and _has_expr(value)) for key, value in spec.items())
    if isinstance(spec, list):
        return any(_has_expr(item) for item in spec)
    return False


def _matches(spec: dict[str, Any], raw: dict[str, Any], doc: dict[str, Any]) -> bool:
    """A query with `$expr` somewhere in its logical operators: clause by clause."""
    for key, value in spec.items():
        if key == "$expr":
            ok = truthy(evaluate(value, raw))
        elif key in _LOGICAL:
            if not isinstance(value, list) or not value:
                raise MongoError(2, f"{key} must be a nonempty array")
            results = (_matches(item, raw, doc) for item in value)
            ok = all(results) if key == "$and" else (any(results) if key == "$or" else not any(results))
        else:
            ok = numeric.matches({key: value}, doc)
        if not ok:
            return False
    return True
