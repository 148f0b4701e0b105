"""Which change events trigger which tasks: routes, and the `$match` they compile to.

A route names a collection, the operation types it reacts to, the tasks to send, and optionally
conditions on the event: `when` (FieldChanged) and `match` (any MongoDB query on the change event).
An app's routes (changeflow.Changeflow.routes, declared with `@app.on` beside the tasks) are used
twice:

- `compile_match(routes)` turns it into the change stream's server-side `$match`, so changes no route
  wants never leave MongoDB;
- `tasks_for(event, routes)` makes the same decision client-side, event by event (a `match` is
  evaluated by changeflow/listener/matching.py, the same query semantics as the server's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from changeflow.listener.matching import check_query, query_matches
from changeflow.listener.ordering import ordering_path

# Operation types a FieldChanged condition can be evaluated on: the others carry neither a
# fullDocument nor an updateDescription.
_DOCUMENT_OPERATIONS = ("insert", "replace")
_UPDATE_OPERATIONS = ("update",)
# Operation types whose events carry fullDocumentBeforeChange when the stream asks for it.
PRE_IMAGE_OPERATIONS = ("update", "replace", "delete")


@dataclass(frozen=True)
class FieldChanged:
    """The event touches a top-level field.

    For an update: `updateDescription.updatedFields` contains the field (it was set, even to the
    same value; a `$set` of a sub-path such as `status.code` does not count). For an insert or a
    replace: the new `fullDocument` has the field.
    """

    field: str

    def __post_init__(self) -> None:
        # Dotted paths would be traversed by the server's $match but not by tasks_for, and the two
        # must agree; one top-level field is all the routes need.
        if not self.field or "." in self.field or self.field.startswith("$"):
            raise ValueError(f"FieldChanged needs a top-level field name, got {self.field!r}")

    def match_for(self, operation_type: str) -> dict[str, Any]:
        """The $match condition for events of this operation type."""
        if operation_type in _UPDATE_OPERATIONS:
            return {f"updateDescription.updatedFields.{self.field}": {"$exists": True}}
        if operation_type in _DOCUMENT_OPERATIONS:
            return {f"fullDocument.{self.field}": {"$exists": True}}
        raise ValueError(f"FieldChanged cannot be evaluated on {operation_type!r} events")

    def holds(self, event: Mapping[str, Any]) -> bool:
        """The same condition, evaluated on one event."""
        operation_type = event.get("operationType")
        if operation_type in _UPDATE_OPERATIONS:
            description = event.get("updateDescription") or {}
            return self.field in (description.get("updatedFields") or {})
        if operation_type in _DOCUMENT_OPERATIONS:
            document = event.get("fullDocument")
            return isinstance(document, Mapping) and self.field in document
        return False


@dataclass(frozen=True)
class Route:
    """Send `tasks` for `operation_types` events on `collection` (when `when` holds and the event
    satisfies the query `match`, if given).

    `pre_images=True`: the route's tasks need the document as it was before the change: the listener
    then opens its stream with `fullDocumentBeforeChange: whenAvailable` and enables pre-images on
    the collection at start-up (changeflow/listener/pre_images.py); the payload of an update,
    replace or delete then carries `fullDocumentBeforeChange` (null when MongoDB kept none).

    `changed_at` (optional) names a top-level date field the application sets when it writes a
    document in a way this route cares about (the creation time for an insert route, e.g. an
    `updated_at` or `status_changed_at` for an update route). Only `python -m listener reconcile`
    reads it, to find the documents written inside a gap of lost history (docs/listener.md).
    """

    collection: str
    operation_types: tuple[str, ...]
    tasks: tuple[str, ...]
    when: FieldChanged | None = None
    changed_at: str | None = None
    match_query: Mapping[str, Any] | None = None
    # The path whose value orders the routed tasks per key ("documentKey" or a payload field path;
    # changeflow/listener/ordering.py), or None: unordered.
    ordered_by: str | bool | None = None
    pre_images: bool = False

    def __post_init__(self) -> None:
        # Accept any sequence (a list reads fine in a route table) but store tuples: routes are
        # hashable constants. A bare string would otherwise be taken letter by letter.
        for name in ("operation_types", "tasks"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.collection:
            raise ValueError("a route needs a collection")
        if not self.operation_types:
            raise ValueError(f"route on {self.collection!r} needs at least one operation type")
        if not self.tasks:
            raise ValueError(f"route on {self.collection!r} needs at least one task")
        if self.changed_at is not None and (not self.changed_at or "." in self.changed_at):
            raise ValueError(f"changed_at needs a top-level field name, got {self.changed_at!r}")
        if self.when is not None:
            for operation_type in self.operation_types:
                self.when.match_for(operation_type)  # raises for operation types it cannot judge
        if self.match_query is not None:
            check_query(self.match_query)
        object.__setattr__(self, "ordered_by", ordering_path(self.ordered_by))
        if self.pre_images and not set(self.operation_types) & set(PRE_IMAGE_OPERATIONS):
            raise ValueError(
                f"route on {self.collection!r} {list(self.operation_types)}: pre_images=True needs an "
                f"operation that has a pre-image ({', '.join(PRE_IMAGE_OPERATIONS)})"
            )

    def __hash__(self) -> int:
        # match_query is a dict (unhashable): hash by its repr, as the rest of the route is hashed.
        return hash((self.collection, self.operation_types, self.tasks, self.when, self.changed_at,
                     repr(self.match_query), self.ordered_by, self.pre_images))  # fmt: skip

    def match(self) -> dict[str, Any]:
        """This route's part of the server-side $match."""
        clause = self._base_match()
        if self.match_query is None:
            return clause
        # $and rather than merging keys: the query may name ns.coll or operationType itself.
        return {"$and": [clause, dict(self.match_query)]}

    def _base_match(self) -> dict[str, Any]:
        clause: dict[str, Any] = {"ns.coll": self.collection}
        if self.when is None:
            clause["operationType"] = {"$in": list(self.operation_types)}
            return clause
        # The condition reads a different field per kind of event (updatedFields for an update,
        # fullDocument for an insert or replace): one alternative per distinct condition.
        by_condition: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for operation_type in self.operation_types:
            condition = self.when.match_for(operation_type)
            by_condition.setdefault(repr(condition), (condition, []))[1].append(operation_type)
        alternatives = [
            {"operationType": {"$in": operation_types}, **condition}
            for condition, operation_types in by_condition.values()
        ]
        if len(alternatives) == 1:
            clause.update(alternatives[0])
        else:
            clause["$or"] = alternatives
        return clause

    def matches(self, event: Mapping[str, Any]) -> bool:
        """The same decision as match(), made on one event."""
        namespace = event.get("ns") or {}
        if namespace.get("coll") != self.collection:
            return False
        if event.get("operationType") not in self.operation_types:
            return False
        if self.when is not None and not self.when.holds(event):
            return False
        return self.match_query is None or query_matches(self.match_query, event)


def compile_match(routes: Iterable[Route]) -> dict[str, Any]:
    """The change stream's `$match` stage body: an event passes when any route wants it."""
    clauses = [route.match() for route in routes]
    if not clauses:
        # `{"$or": []}` is rejected by MongoDB; a listener without routes is a configuration error.
        raise ValueError("no routes: the listener would have nothing to do")
    return clauses[0] if len(clauses) == 1 else {"$or": clauses}


def tasks_for(event: Mapping[str, Any], routes: Iterable[Route]) -> list[str]:
    """Task names for one change event, in route order, each name once."""
    names: dict[str, None] = {}  # an ordered set
    for route in routes:
        if route.matches(event):
            names.update(dict.fromkeys(route.tasks))
    return list(names)
