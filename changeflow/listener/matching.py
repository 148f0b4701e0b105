"""Evaluating a route's `match` (a MongoDB query on the change event) on one event, client-side.

The server applies the same query in the change stream's `$match`; the listener must make the same
decision per event (which tasks an event triggers). Rather than a query matcher of our own, this is
mongomock's filter implementation, a maintained MongoDB query evaluator (also what the MongoDB test
server stores documents with). It is not part of mongomock's documented API, so it is reached only
here; tests/unit/test_matching.py fails loudly if an upgrade moves it. docs/decisions.md has the
agreement test that compares it with the server on a table of cases.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bson import Decimal128
from mongomock.filtering import filter_applies

log = logging.getLogger(__name__)

__all__ = ["check_query", "query_matches"]


def query_matches(query: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    """True when `event` satisfies the MongoDB query `query`, as the server's `$match` decides.

    A value the matcher cannot compare (a BSON type it does not order) counts as a match, with a
    warning: the event did pass the server's `$match`, which has the last word on what is delivered.
    """
    try:
        return bool(filter_applies(comparable(query), comparable(event)))
    except NotImplementedError as exc:
        log.warning(
            "match %r cannot be evaluated on event %r (%s): routed as matching", query, event.get("_id"), exc
        )
        return True


def comparable(value: Any) -> Any:
    """`value` with Decimal128 as decimal.Decimal, which the matcher compares with ints and floats as
    MongoDB compares numbers of different types (exactly); Decimal128 itself it cannot order."""
    if isinstance(value, Decimal128):
        number = value.to_decimal()
        return float(number) if number.is_nan() else number  # a NaN Decimal refuses to be ordered
    if isinstance(value, Mapping):
        return {key: comparable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [comparable(item) for item in value]
    return value


def check_query(query: Mapping[str, Any]) -> None:
    """ValueError when `query` is not a query document the matcher accepts (checked when the route is made).

    The matcher parses lazily, so it is run once on an empty event: unknown operators and malformed
    operands fail now rather than at the first event.
    """
    if not isinstance(query, Mapping):
        raise ValueError(f"match must be a query document (a mapping), got {type(query).__name__}")
    if not query:
        raise ValueError("match must not be empty (leave it out to match every event of the route)")
    try:
        # Clause by clause: the matcher stops at the first clause an empty event fails.
        for key, value in query.items():
            filter_applies({key: value}, {})
    except Exception as exc:  # mongomock raises its own OperationFailure / NotImplementedError
        raise ValueError(f"match {dict(query)!r} is not a query the listener can evaluate: {exc}") from exc
