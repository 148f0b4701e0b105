"""Read-only views, kept as mongod 7.0 keeps them: one document per view in `<db>.system.views`
(`{_id: "<db>.<view>", viewOn, pipeline}`), resolved when read into an aggregation over the source
collection (the view's pipeline, a view on a view unfolded, then the query's own stages).

Writes, indexes and change streams on a view fail as on mongod (CommandNotSupportedOnView, 166).
With `showExpandedEvents`, database and cluster streams see `create`, `modify` (collMod) and `drop`
of a view: mongod derives them from its writes to `system.views`, so they carry the definition as
`operationDescription` and no `collectionUUID`, and collection streams never see them.
"""

from __future__ import annotations

from typing import Any

import mongomock
from bson import Int64

from changeflow.testing.mongo_double import numeric, storage
from changeflow.testing.mongo_double.changestreams import KNOWN_STAGES, EventLog, translate_stages
from changeflow.testing.mongo_double.errors import MongoError
from changeflow.testing.mongo_double.storage import ChangeRecord, Store

SYSTEM_VIEWS = "system.views"
VIEW_NOT_SUPPORTED = 166  # CommandNotSupportedOnView
_WRITE_STAGES = ("$out", "$merge")
_TYPE_NAMES = {bool: "bool", int: "int", Int64: "long", float: "double", str: "string", dict: "object",
               list: "array", type(None): "null"}  # fmt: skip


def not_a_collection(db: str, name: str) -> MongoError:
    return MongoError(VIEW_NOT_SUPPORTED, f"Namespace {db}.{name} is a view, not a collection")


def definition(store: Store, db: str, name: str) -> dict[str, Any] | None:
    """The view's system.views document, or None when `name` is not a view (a dict lookup: every write
    asks)."""
    if name.startswith("system."):
        return None
    return storage.by_id(store.collection(db, SYSTEM_VIEWS), f"{db}.{name}")


def is_view(store: Store, db: str, name: str | None) -> bool:
    return name is not None and definition(store, db, name) is not None


def has_system_views(store: Store, db: str) -> bool:
    """Whether `<db>.system.views` exists (mongod creates it with the first view and keeps it)."""
    try:
        return SYSTEM_VIEWS in store.client[db]._get_created_collections()
    except AttributeError:  # mongomock internals changed: fall back to whether any view is defined
        return bool(list(store.collection(db, SYSTEM_VIEWS).find({}, limit=1)))


def all_views(store: Store, db: str) -> list[dict[str, Any]]:
    """listCollections documents of the views of `db`, by name."""
    out = []
    for doc in store.collection(db, SYSTEM_VIEWS).find():
        name = str(doc["_id"]).split(".", 1)[1]
        out.append(
            {
                "name": name,
                "type": "view",
                "options": {k: v for k, v in doc.items() if k != "_id"},
                "info": {"readOnly": True},
            }
        )
    return sorted(out, key=lambda d: d["name"])


def resolve(store: Store, db: str, name: str) -> tuple[str, list[dict[str, Any]]] | None:
    """(source collection, full pipeline) of a view, None for anything else."""
    found = definition(store, db, name)
    if found is None:
        return None
    pipeline: list[dict[str, Any]] = []
    source = name
    while found is not None:
        pipeline = list(found.get("pipeline") or []) + pipeline
        source = found["viewOn"]
        found = definition(store, db, source)
    return source, translate_stages(pipeline)


# ---------------------------------------------------------------------------------------------
# DDL: create, collMod, drop


def _type_error(command: str, field: str, value: Any, expected: str) -> MongoError:
    got = _TYPE_NAMES.get(type(value), type(value).__name__)
    return MongoError(
        14, f"BSON field '{command}.{field}' is the wrong type '{got}', expected type '{expected}'"
    )


def _checked(store: Store, db: str, name: str, command: str, view_on: Any, pipeline: Any) -> dict[str, Any]:
    """A view definition checked as mongod checks it (types, stages, cycles)."""
    if not isinstance(view_on, str):
        raise _type_error(command, "viewOn", view_on, "string")
    if not view_on:
        raise MongoError(2, "'viewOn' cannot be empty")
    if not isinstance(pipeline, list):
        raise _type_error(command, "pipeline", pipeline, "array")
    ns = f"{db}.{name}"
    for index, stage in enumerate(pipeline):
        if not isinstance(stage, dict) or len(stage) != 1:
            raise MongoError(40323, "A pipeline stage specification object must contain exactly one field.")
        stage_name = next(iter(stage))
        if stage_name not in KNOWN_STAGES:
            raise MongoError(40324, f"Unrecognized pipeline stage name: '{stage_name}'")
        if stage_name in _WRITE_STAGES:
            raise MongoError(
                167,
                f"Invalid pipeline for view {ns} :: caused by :: The aggregation stage {stage_name} in "
                f"location {index} of the pipeline cannot be used in the view definition of {ns} "
                "because it writes to disk",
            )
        if stage_name == "$changeStream":
            raise MongoError(
                167,
                f"Invalid pipeline for view {ns} :: caused by :: $changeStream cannot be used in a view "
                "definition",
            )
        if stage_name not in mongomock.aggregate._PIPELINE_HANDLERS:
            raise MongoError(115, f"{stage_name} in a view is not supported by the MongoDB test server")
    chain = []
    current: str | None = view_on
    while current is not None:
        chain.append(current)
        if current == name:
            path = " => ".join(f"{db}.{n}" for n in [name, name, *chain])
            raise MongoError(5, f"View cycle detected: {path}")  # GraphContainsCycle
        found = definition(store, db, current)
        current = found["viewOn"] if found is not None else None
    return {"viewOn": view_on, "pipeline": pipeline}


def create(
    store: Store, log: EventLog, db: str, name: str, cmd: dict[str, Any], envelope: tuple[str, ...]
) -> None:
    """`create` with `viewOn` (and `pipeline`); the caller holds the storage lock."""
    options = set(cmd) - {"create", "viewOn", "pipeline", "collation", *envelope}
    if options:
        raise MongoError(115, f"view option(s) {sorted(options)} not supported by the MongoDB test server")
    collation = cmd.get("collation")
    if collation is not None and collation != {"locale": "simple"}:
        # mongod gives the view this default collation; mongomock has no collations to apply it with.
        raise MongoError(115, "a view with a collation is not supported by the MongoDB test server")
    if definition(store, db, name) is not None:
        raise MongoError(48, f"A view already exists. NS: {db}.{name}")
    if store.exists(db, name):
        raise MongoError(48, f"Collection already exists. NS: {db}.{name}")
    spec = _checked(store, db, name, "create", cmd.get("viewOn"), cmd.get("pipeline", []))
    store.collection(db, SYSTEM_VIEWS).insert_one({"_id": f"{db}.{name}", **spec})
    log.append([ChangeRecord("create", db, name, description=spec, view=True)])


def coll_mod(
    store: Store, log: EventLog, db: str, name: str, cmd: dict[str, Any], envelope: tuple[str, ...]
) -> None:
    """`collMod` of a view: `viewOn` and `pipeline` each replace their own half of the definition."""
    old = definition(store, db, name)
    assert old is not None
    for option in cmd:
        if option not in ("collMod", "viewOn", "pipeline", *envelope):
            raise MongoError(72, f"option not supported on a view: {option}")
    if "viewOn" not in cmd and "pipeline" not in cmd:
        return
    spec = _checked(
        store, db, name, "collMod", cmd.get("viewOn", old["viewOn"]), cmd.get("pipeline", old["pipeline"])
    )
    store.collection(db, SYSTEM_VIEWS).replace_one({"_id": f"{db}.{name}"}, {"_id": f"{db}.{name}", **spec})
    log.append([ChangeRecord("modify", db, name, description=spec, view=True)])


def drop(store: Store, log: EventLog, db: str, name: str) -> None:
    store.collection(db, SYSTEM_VIEWS).delete_one({"_id": f"{db}.{name}"})
    log.append([ChangeRecord("drop", db, name, view=True)])


# ---------------------------------------------------------------------------------------------
# Reads and refused writes


def find_stages(cmd: dict[str, Any]) -> list[dict[str, Any]]:
    """A find (or count) on a view as the aggregation stages mongod turns it into."""
    stages: list[dict[str, Any]] = []
    if cmd.get("filter"):
        stages.append({"$match": cmd["filter"]})
    if cmd.get("sort"):
        stages.append({"$sort": cmd["sort"]})
    if cmd.get("skip"):
        stages.append({"$skip": int(cmd["skip"])})
    if cmd.get("limit"):
        stages.append({"$limit": abs(int(cmd["limit"]))})
    if cmd.get("projection"):
        stages.append({"$project": cmd["projection"]})
    return stages


def _distinct_marker(item: Any) -> tuple[str, Any]:
    # Numbers of every type are one value when equal (mongod compares them by value).
    number = numeric.number_key(item)
    if number is not None:
        return ("n", number)
    return (type(item).__name__ if isinstance(item, bool | str) else "v", repr(item))


def distinct_values(docs: list[dict[str, Any]], key: str) -> list[Any]:
    """distinct over documents (a view's or a collection's): the values at `key`, arrays contributing
    their elements, each value once in the order first met."""
    out: list[Any] = []
    seen: set[tuple[str, Any]] = set()
    for doc in docs:
        values: list[Any] = [doc]
        for part in key.split("."):
            nxt: list[Any] = []
            for value in values:
                items = value if isinstance(value, list) else [value]
                nxt.extend(item[part] for item in items if isinstance(item, dict) and part in item)
            values = nxt
        for value in values:
            for item in value if isinstance(value, list) else [value]:
                marker = _distinct_marker(item)
                if marker not in seen:
                    seen.add(marker)
                    out.append(item)
    return out


def refused_writes(db: str, name: str, statements: int, ordered: bool, kind: str) -> dict[str, Any]:
    """The reply of an insert/update/delete on a view: one write error per statement tried."""
    err = not_a_collection(db, name)
    errors = [storage.write_error(i, err) for i in range(1 if ordered else max(statements, 1))]
    reply: dict[str, Any] = {"n": 0, "nModified": 0} if kind == "update" else {"n": 0}
    reply["writeErrors"] = errors
    return reply
