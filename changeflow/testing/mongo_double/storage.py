"""Documents, indexes and collection options, stored in mongomock behind one global lock.

Query, update and aggregation semantics are mongomock's; this module only adds what a server
needs around them: write results and write errors in wire shape, unique-index errors as code 11000,
per-collection options (pre- and post-images) and a ChangeRecord for every write, from which the
change-event log builds its events. Functions take a `View` so the same code serves the real store
and a transaction's private copy of the collections it touches.
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import bson.errors
import mongomock
import pymongo.errors
from bson import ObjectId

from changeflow.testing.mongo_double import indexes, pipeline_updates
from changeflow.testing.mongo_double import update_description as diffs
from changeflow.testing.mongo_double.errors import (
    BSON_MAX_INTERNAL_SIZE,
    BSON_MAX_USER_SIZE,
    DuplicateKey,
    MongoError,
    bson_object_too_large,
)


@dataclass
class ChangeRecord:
    """One write as the change-event log needs it."""

    op: str  # insert, update, replace, delete, drop, rename, dropDatabase
    db: str
    coll: str | None
    document_key: dict[str, Any] | None = None
    full_document: dict[str, Any] | None = None  # insert/replace document, or update post-image
    pre_image: dict[str, Any] | None = None
    update_description: dict[str, Any] | None = None
    to: dict[str, str] | None = None
    images_enabled: bool = False  # the collection recorded pre/post-images when this write happened
    # showExpandedEvents: the collection's UUID when the write happened (stamped by the log if unset),
    # the DDL event's operationDescription, and a modify event's stateBeforeChange.
    uuid: uuid.UUID | None = None
    description: dict[str, Any] | None = None
    state_before: dict[str, Any] | None = None
    view: bool = False  # a view's create/modify/drop (views.py): expanded database/cluster streams only
    # updateDescription.disambiguatedPaths, shown only to streams opened with showExpandedEvents.
    disambiguated_paths: dict[str, list[str | int]] | None = None


@dataclass
class CollectionMeta:
    uuid: uuid.UUID = field(default_factory=uuid.uuid4)
    images: bool = False
    announced: bool = False  # its create event is in the log (mongod logs one for implicit creates too)


class View(Protocol):
    """Where an operation reads and writes: the shared store or a transaction's copy."""

    def collection(self, db: str, name: str) -> mongomock.Collection: ...

    def exists(self, db: str, name: str) -> bool: ...

    def images_enabled(self, db: str, name: str) -> bool: ...


class Store:
    """The shared data. Hold `lock` around every operation that reads or writes it."""

    def __init__(self) -> None:
        # Re-entrant: commit replays a transaction's operations through the same functions.
        self.lock = threading.RLock()
        self.client = indexes.indexed_client()
        self.meta: dict[tuple[str, str], CollectionMeta] = {}
        self._collections: dict[tuple[str, str], mongomock.Collection] = {}

    def collection(self, db: str, name: str) -> mongomock.Collection:
        # mongomock builds a new Collection (with_options, codec checks) on every client[db][name]: a
        # noticeable part of each command. Keeping the first is safe: a mongomock Collection finds its
        # documents by name on every access, so drops and renames are seen.
        found = self._collections.get((db, name))
        if found is None:
            found = self._collections[(db, name)] = self.client[db][name]
        return found

    def exists(self, db: str, name: str) -> bool:
        return name in self.client[db].list_collection_names()

    def database_names(self) -> list[str]:
        return [
            name for name in self.client.list_database_names() if self.client[name].list_collection_names()
        ]

    def collection_names(self, db: str) -> list[str]:
        return self.client[db].list_collection_names()

    def coll_meta(self, db: str, name: str) -> CollectionMeta:
        return self.meta.setdefault((db, name), CollectionMeta())

    def images_enabled(self, db: str, name: str) -> bool:
        meta = self.meta.get((db, name))
        return bool(meta and meta.images)

    def forget(self, db: str, name: str) -> None:
        self.meta.pop((db, name), None)


# ---------------------------------------------------------------------------------------------
# Error mapping


def map_exception(exc: Exception, ns: str) -> MongoError:
    """A mongomock / Python exception as the MongoDB error a server would answer."""
    if isinstance(exc, PartialWrite):
        exc = exc.cause
    if isinstance(exc, MongoError):
        return exc
    if isinstance(exc, pymongo.errors.DuplicateKeyError):
        return DuplicateKey(ns)
    if isinstance(exc, NotImplementedError):
        return MongoError(115, f"not supported by the MongoDB test server: {exc}")
    if isinstance(exc, pymongo.errors.OperationFailure):
        code = exc.code if isinstance(exc.code, int) and exc.code else 2
        return MongoError(code, str(exc._message if hasattr(exc, "_message") else exc))
    if isinstance(
        exc,
        pymongo.errors.PyMongoError
        | bson.errors.BSONError
        | ValueError
        | TypeError
        | KeyError
        | AttributeError,
    ):
        return MongoError(2, f"{type(exc).__name__}: {exc}")
    raise exc


def write_error(index: int, err: MongoError) -> dict[str, Any]:
    doc: dict[str, Any] = {"index": index, "code": err.code, "errmsg": err.errmsg}
    doc.update(err.extra)
    return doc


# ---------------------------------------------------------------------------------------------
# updateDescription


def update_description(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Diff two versions of a document the way mongod's v2 oplog diff reports it."""
    updated: dict[str, Any] = {}
    removed: list[str] = []
    truncated: list[dict[str, Any]] = []
    _diff_object(before, after, "", updated, removed, truncated)
    return {"updatedFields": updated, "removedFields": removed, "truncatedArrays": truncated}


_ARRAY_OPS = frozenset({"$push", "$addToSet", "$pop", "$pull", "$pullAll"})
_FIELD_OPS = frozenset(
    {
        "$set",
        "$inc",
        "$mul",
        "$min",
        "$max",
        "$currentDate",
        "$bit",
        "$unset",
        "$rename",
        "$setOnInsert",
        *_ARRAY_OPS,
    }
)
_MISSING = object()


def update_description_for(
    update_doc: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
) -> dict[str, Any]:
    """updateDescription as mongod logs it for an operator update: one entry per modified path, so
    `$set: {sub: {...}}` reports `sub` whole, where a document diff would report `sub.x`, `sub.y`.
    Array operators report the array's own changes (appended indexes, truncatedArrays)."""
    paths = [p for spec in update_doc.values() if isinstance(spec, dict) for p in spec]
    if set(update_doc) - _FIELD_OPS or any("$" in p for p in paths):
        return update_description(before, after)  # positional paths: only a diff knows what changed
    updated: dict[str, Any] = {}
    removed: list[str] = []
    truncated: list[dict[str, Any]] = []
    for op, spec in update_doc.items():
        if op == "$setOnInsert" or not isinstance(spec, dict):
            continue
        for path, arg in spec.items():
            old, new = _lookup(before, path), _lookup(after, path)
            if op == "$unset":
                if old is not _MISSING:
                    removed.append(path)
            elif op == "$rename":
                if old is not _MISSING:
                    removed.append(path)
                    updated[arg] = _lookup(after, arg)
            elif new is _MISSING:
                continue
            elif op in _ARRAY_OPS and isinstance(old, list) and isinstance(new, list):
                _diff_value(old, new, path, updated, removed, truncated)
            elif old is _MISSING and (created := _created_path(before, path)) != path:
                # mongod logs a sub-document the update created whole: `$set: {"a.b": 1}` on {} is `a`.
                updated[created] = _lookup(after, created)
            elif old is _MISSING or type(old) is not type(new) or old != new:
                updated[path] = new
    return {"updatedFields": updated, "removedFields": removed, "truncatedArrays": truncated}


def _created_path(before: dict[str, Any], path: str) -> str:
    """The prefix of `path` up to its first field missing from a document in `before`."""
    parts = path.split(".")
    doc: Any = before
    for depth, part in enumerate(parts):
        if isinstance(doc, dict):
            if part not in doc:
                return ".".join(parts[: depth + 1])
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return path
    return path


def _lookup(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _MISSING
    return doc


def _diff_object(
    old: dict[str, Any], new: dict[str, Any], prefix: str, updated: dict, removed: list, truncated: list
) -> None:
    for key in old:
        if key not in new:
            removed.append(prefix + key)
    for key, value in new.items():
        path = prefix + key
        if key not in old:
            updated[path] = value
        else:
            _diff_value(old[key], value, path, updated, removed, truncated)


def _diff_value(old: Any, new: Any, path: str, updated: dict, removed: list, truncated: list) -> None:
    if type(old) is type(new) and old == new:
        return
    if (
        isinstance(old, dict)
        and isinstance(new, dict)
        and [k for k in old if k in new] == [k for k in new if k in old]
    ):
        _diff_object(old, new, path + ".", updated, removed, truncated)
    elif isinstance(old, list) and isinstance(new, list):
        if len(new) < len(old):
            truncated.append({"field": path, "newSize": len(new)})
        for i, item in enumerate(new):
            if i >= len(old):
                updated[f"{path}.{i}"] = item
            else:
                _diff_value(old[i], item, f"{path}.{i}", updated, removed, truncated)
    else:
        updated[path] = new


# ---------------------------------------------------------------------------------------------
# Writes


def _is_replacement(update: Any) -> bool:
    return isinstance(update, dict) and not any(k.startswith("$") for k in update)


def insert(
    view: View, db: str, coll: str, docs: list[dict[str, Any]], ordered: bool = True
) -> tuple[int, list[dict[str, Any]], list[ChangeRecord]]:
    """Insert documents; returns (n, writeErrors, records)."""
    c = view.collection(db, coll)
    images = view.images_enabled(db, coll)
    n, errors, records = 0, [], []
    for index, doc in enumerate(docs):
        try:
            if not isinstance(doc, dict):
                raise MongoError(14, "document to insert must be an object")
            doc = dict(doc)
            if "_id" not in doc:
                # Servers put a generated _id first.
                doc = {"_id": ObjectId(), **doc}
            doc = id_first(doc)
            size = bson_size(doc)
            if size > BSON_MAX_USER_SIZE:
                raise MongoError(
                    2, f"object to insert too large. size in bytes: {size}, max size: {BSON_MAX_USER_SIZE}"
                )
            c.insert_one(doc)
        except Exception as exc:
            err = map_exception(exc, f"{db}.{coll}")
            if err.code == 11000:
                err = _dup_detail(view, db, coll, doc)
            errors.append(write_error(index, err))
            if ordered:
                break
            continue
        n += 1
        stored = by_id(c, doc["_id"])
        records.append(
            ChangeRecord("insert", db, coll, {"_id": doc["_id"]}, full_document=stored, images_enabled=images)
        )
    return n, errors, records


def by_id(c: mongomock.Collection, _id: Any) -> dict[str, Any] | None:
    """The document with this _id: a dict lookup in mongomock's store, where find_one would scan every
    document (it made inserts O(n))."""
    try:
        key = mongomock.helpers.hashdict(_id) if isinstance(_id, dict) else _id
        doc = c._store[key]
    except KeyError:
        return None
    except Exception:  # mongomock internals changed: take the slow, public path
        return c.find_one({"_id": _id})
    return copy.deepcopy(doc)


def _dup_detail(view: View, db: str, coll: str, doc: dict[str, Any]) -> DuplicateKey:
    """Name the violated unique index in the error, as mongod does (keyPattern, keyValue)."""
    c = view.collection(db, coll)
    ns = f"{db}.{coll}"
    if "_id" in doc and c.count_documents({"_id": doc["_id"]}):
        return DuplicateKey(
            ns, f" index: _id_ dup key: {{ _id: {doc['_id']!r} }}", {"_id": 1}, {"_id": doc["_id"]}
        )
    for name, info in c.index_information().items():
        if not info.get("unique"):
            continue
        keys = [k for k, _ in info["key"]]
        value = {k: _get_path(doc, k) for k in keys}
        if c.count_documents(value):
            return DuplicateKey(
                ns, f" index: {name} dup key: {value!r}", {k: d for k, d in info["key"]}, value
            )
    return DuplicateKey(ns)


def _get_path(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(doc, dict):
            doc = doc.get(part)
        else:
            return None
    return doc


def update(
    view: View, db: str, coll: str, statements: list[dict[str, Any]], ordered: bool = True
) -> tuple[dict[str, Any], list[ChangeRecord]]:
    """The update command; returns (reply fields n/nModified/upserted/writeErrors, records)."""
    n = modified = 0
    upserted: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    records: list[ChangeRecord] = []
    for index, stmt in enumerate(statements):
        try:
            if "c" in stmt:  # mongomock's expressions cannot see the constants: refuse, not ignore
                raise MongoError(115, "update constants ('c') are not supported by the MongoDB test server")
            matched, mod, upserted_id, recs = update_statement(
                view,
                db,
                coll,
                stmt.get("q", {}),
                stmt.get("u"),
                upsert=bool(stmt.get("upsert")),
                multi=bool(stmt.get("multi")),
                array_filters=stmt.get("arrayFilters"),
            )
        except PartialWrite as partial:
            records.extend(partial.records)
            n += partial.modified
            modified += partial.modified
            errors.append(write_error(index, map_exception(partial.cause, f"{db}.{coll}")))
            if ordered:
                break
            continue
        except Exception as exc:
            errors.append(write_error(index, map_exception(exc, f"{db}.{coll}")))
            if ordered:
                break
            continue
        records.extend(recs)
        if upserted_id is not None:
            upserted.append({"index": index, "_id": upserted_id})
            n += 1
        else:
            n += matched
            modified += mod
    reply: dict[str, Any] = {"n": n, "nModified": modified}
    if upserted:
        reply["upserted"] = upserted
    if errors:
        reply["writeErrors"] = errors
    return reply, records


def update_statement(
    view: View,
    db: str,
    coll: str,
    query: dict[str, Any],
    update_doc: Any,
    *,
    upsert: bool = False,
    multi: bool = False,
    array_filters: list[dict[str, Any]] | None = None,
    sort: list[tuple[str, int]] | None = None,
) -> tuple[int, int, Any, list[ChangeRecord]]:
    """One update statement; returns (matched, modified, upserted _id or None, records)."""
    if pipeline_updates.is_pipeline(update_doc):
        return _pipeline_statement(view, db, coll, query, update_doc, upsert=upsert, multi=multi, sort=sort)
    if not isinstance(update_doc, dict):
        raise MongoError(9, "Update argument must be either an object or an array")
    replacement = _is_replacement(update_doc)
    if replacement and multi:
        raise MongoError(9, "multi update is not supported for replacement-style update")
    c = view.collection(db, coll)
    images = view.images_enabled(db, coll)
    befores = list(c.find(query, sort=sort, limit=0 if multi else 1))
    if not befores:
        if not upsert:
            return 0, 0, None, []
        if replacement:
            result = c.replace_one(query, update_doc, upsert=True)
        else:
            result = c.update_one(query, update_doc, upsert=True, array_filters=array_filters)
        new_id = result.upserted_id
        stored = by_id(c, new_id)
        if stored is not None and next(iter(stored)) != "_id":
            # mongomock puts the new _id after the query's fields; mongod stores _id first.
            stored = id_first(stored)
            c.replace_one({"_id": new_id}, stored)
        if stored is not None and bson_size(stored) > BSON_MAX_USER_SIZE:
            c.delete_one({"_id": new_id})  # under the storage lock: nobody saw it
            raise MongoError(17420, f"Document to upsert is larger than {BSON_MAX_USER_SIZE}")
        return (
            0,
            0,
            new_id,
            [ChangeRecord("insert", db, coll, {"_id": new_id}, stored, images_enabled=images)],
        )
    records: list[ChangeRecord] = []
    modified = 0
    try:
        for before in befores:
            modified += _update_one_document(
                c,
                db,
                coll,
                query,
                update_doc,
                before,
                replacement,
                multi,
                sort,
                array_filters,
                images,
                records,
            )
    except Exception as exc:
        # A multi update that fails half-way keeps what it changed (as on mongod): report those events.
        raise PartialWrite(exc, modified, records) from exc
    return len(befores), modified, None, records


class PartialWrite(Exception):
    """A statement failed after it had already changed some documents."""

    def __init__(self, cause: Exception, modified: int, records: list[ChangeRecord]) -> None:
        super().__init__(str(cause))
        self.cause, self.modified, self.records = cause, modified, records


def _update_one_document(
    c: mongomock.Collection,
    db: str,
    coll: str,
    query: dict[str, Any],
    update_doc: dict[str, Any],
    before: dict[str, Any],
    replacement: bool,
    multi: bool,
    sort: list[tuple[str, int]] | None,
    array_filters: list[dict[str, Any]] | None,
    images: bool,
    records: list[ChangeRecord],
) -> int:
    """Apply the update to one matched document; returns 1 if it changed, appending its record."""
    # Pin the statement to this document (sort / multi) while keeping the query for `$`.
    # Without sort or multi, mongomock's update_one picks the same first match find did.
    pinned = query
    if multi or sort is not None:
        pinned = (
            {"$and": [query, {"_id": before["_id"]}]} if "_id" in query else {**query, "_id": before["_id"]}
        )
    if replacement:
        if "_id" in update_doc and update_doc["_id"] != before["_id"]:
            raise MongoError(
                66, "After applying the update, the (immutable) field '_id' was found to have been altered"
            )
        c.replace_one(pinned, update_doc)
    else:
        c.update_one(pinned, update_doc, array_filters=array_filters)
    after = by_id(c, before["_id"])
    if after is None or (after == before and list(after) == list(before)):
        return 0  # a no-op write: mongod logs no oplog entry, so no event either
    _refuse_oversized(c, before, after)
    key = {"_id": before["_id"]}
    if replacement:
        records.append(ChangeRecord("replace", db, coll, key, after, before, images_enabled=images))
    else:
        description = update_description_for(update_doc, before, after)
        record = ChangeRecord("update", db, coll, key, after, before, description, images_enabled=images)
        record.disambiguated_paths = diffs.disambiguate(description, before, after)
        records.append(record)
    return 1


def id_first(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with `_id` as its first field, where mongod always stores it."""
    if "_id" not in doc or next(iter(doc)) == "_id":
        return doc
    return {"_id": doc["_id"], **doc}


def _pipeline_statement(
    view: View,
    db: str,
    coll: str,
    query: dict[str, Any],
    pipeline: list[Any],
    *,
    upsert: bool,
    multi: bool,
    sort: list[tuple[str, int]] | None,
) -> tuple[int, int, Any, list[ChangeRecord]]:
    """A pipeline-style update statement, as update_statement returns it. Its event carries mongod's
    diff of the two versions, or is a `replace` when mongod would log the whole document."""
    stages = pipeline_updates.validate(pipeline)
    c = view.collection(db, coll)
    images = view.images_enabled(db, coll)
    befores = list(c.find(query, sort=sort, limit=0 if multi else 1))
    if not befores:
        if not upsert:
            return 0, 0, None, []
        doc = pipeline_updates.apply(stages, pipeline_updates.upsert_seed(query))
        doc = id_first(doc) if "_id" in doc else {"_id": ObjectId(), **doc}
        if bson_size(doc) > BSON_MAX_USER_SIZE:
            raise MongoError(17420, f"Document to upsert is larger than {BSON_MAX_USER_SIZE}")
        c.insert_one(doc)
        stored = by_id(c, doc["_id"])
        record = ChangeRecord("insert", db, coll, {"_id": doc["_id"]}, stored, images_enabled=images)
        return 0, 0, doc["_id"], [record]
    records: list[ChangeRecord] = []
    modified = 0
    try:
        for before in befores:
            result = pipeline_updates.apply(stages, before)
            if diffs.binary_equal(result, before):
                continue  # a no-op write: no oplog entry, no event
            c.replace_one({"_id": before["_id"]}, id_first(result))
            after = by_id(c, before["_id"])
            assert after is not None
            _refuse_oversized(c, before, after)
            key = {"_id": before["_id"]}
            diff = diffs.oplog_diff(before, result)
            if diff is None:
                records.append(ChangeRecord("replace", db, coll, key, after, before, images_enabled=images))
            else:
                description, paths = diffs.describe(diff)
                record = ChangeRecord(
                    "update", db, coll, key, after, before, description, images_enabled=images
                )
                record.disambiguated_paths = paths
                records.append(record)
            modified += 1
    except Exception as exc:
        raise PartialWrite(exc, modified, records) from exc
    return len(befores), modified, None, records


def bson_size(doc: dict[str, Any]) -> int:
    return len(bson.encode(doc))


def _refuse_oversized(c: mongomock.Collection, before: dict[str, Any], after: dict[str, Any]) -> None:
    """Undo an update whose result exceeds the document size limit, failing as mongod's update stage
    does: 10334 when it cannot even build the object, else 17419."""
    size = bson_size(after)
    if size <= BSON_MAX_USER_SIZE:
        return
    c.replace_one({"_id": before["_id"]}, before)  # under the storage lock: nobody saw the result
    if size > BSON_MAX_INTERNAL_SIZE:
        raise bson_object_too_large(size, f"_id: {before['_id']!r}")
    raise MongoError(17419, f"Resulting document after update is larger than {BSON_MAX_USER_SIZE}")


def delete(
    view: View, db: str, coll: str, statements: list[dict[str, Any]], ordered: bool = True
) -> tuple[int, list[dict[str, Any]], list[ChangeRecord]]:
    n, errors, records = 0, [], []
    for index, stmt in enumerate(statements):
        try:
            count, recs = delete_statement(view, db, coll, stmt.get("q", {}), multi=stmt.get("limit", 0) == 0)
        except Exception as exc:
            errors.append(write_error(index, map_exception(exc, f"{db}.{coll}")))
            if ordered:
                break
            continue
        n += count
        records.extend(recs)
    return n, errors, records


def delete_statement(
    view: View, db: str, coll: str, query: dict[str, Any], *, multi: bool, sort: list | None = None
) -> tuple[int, list[ChangeRecord]]:
    c = view.collection(db, coll)
    images = view.images_enabled(db, coll)
    victims = list(c.find(query, sort=sort, limit=0 if multi else 1))
    records = []
    for doc in victims:
        c.delete_one({"_id": doc["_id"]})
        records.append(
            ChangeRecord("delete", db, coll, {"_id": doc["_id"]}, pre_image=doc, images_enabled=images)
        )
    return len(victims), records


def find_and_modify(
    view: View, db: str, coll: str, cmd: dict[str, Any]
) -> tuple[dict[str, Any], list[ChangeRecord]]:
    """findAndModify; returns (reply fields lastErrorObject/value, records)."""
    c = view.collection(db, coll)
    query = cmd.get("query") or {}
    sort = list((cmd.get("sort") or {}).items()) or None
    fields = cmd.get("fields")
    before = next(iter(c.find(query, sort=sort, limit=1)), None)
    if cmd.get("remove"):
        if cmd.get("update") is not None or cmd.get("new"):
            raise MongoError(9, "Cannot specify both an update and remove=true")
        if before is None:
            return {"lastErrorObject": {"n": 0}, "value": None}, []
        _, records = delete_statement(view, db, coll, {"_id": before["_id"]}, multi=False)
        return {"lastErrorObject": {"n": 1}, "value": _project(before, fields)}, records
    update_doc = cmd.get("update")
    if update_doc is None:
        raise MongoError(9, "Either an update or remove=true must be specified")
    if before is None or sort is None:
        pinned = query
    elif "_id" in query:
        pinned = {"$and": [query, {"_id": before["_id"]}]}
    else:
        pinned = {**query, "_id": before["_id"]}
    matched, _, upserted_id, records = update_statement(
        view,
        db,
        coll,
        pinned,
        update_doc,
        upsert=bool(cmd.get("upsert")),
        array_filters=cmd.get("arrayFilters"),
    )
    leo: dict[str, Any] = {
        "n": 1 if (matched or upserted_id is not None) else 0,
        "updatedExisting": bool(matched),
    }
    if upserted_id is not None:
        leo["upserted"] = upserted_id
        value = by_id(c, upserted_id) if cmd.get("new") else None
    elif before is None:
        value = None
    else:
        value = by_id(c, before["_id"]) if cmd.get("new") else before
    return {"lastErrorObject": leo, "value": _project(value, fields)}, records


def _project(doc: dict[str, Any] | None, fields: dict[str, Any] | None) -> dict[str, Any] | None:
    if doc is None or not fields:
        return doc
    scratch = mongomock.MongoClient()["p"]["p"]
    scratch.insert_one(doc)
    return scratch.find_one({}, fields)


def copy_indexes(src: mongomock.Collection, dst: mongomock.Collection) -> None:
    """Index definitions of src (other than _id_) onto dst."""
    for name, info in src.index_information().items():
        if name == "_id_":
            continue
        kwargs = {k: v for k, v in info.items() if k in ("unique", "sparse", "partialFilterExpression")}
        dst.create_index(info["key"], name=name, **kwargs)


def copy_collection(src: mongomock.Collection, dst: mongomock.Collection) -> None:
    """Documents and index definitions of src into the (empty) dst."""
    copy_indexes(src, dst)
    docs = list(src.find())
    if docs:
        dst.insert_many(docs)
    elif dst.name not in dst.database.list_collection_names():
        dst.database.create_collection(dst.name)


def iter_find(c: mongomock.Collection, cmd: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Documents of a find command (filter, projection, sort, skip, limit)."""
    sort = list((cmd.get("sort") or {}).items()) or None
    limit = abs(int(cmd.get("limit") or 0))
    cursor = c.find(
        cmd.get("filter") or {},
        cmd.get("projection") or None,
        sort=sort,
        skip=int(cmd.get("skip") or 0),
        limit=limit,
    )
    # mongomock's Cursor re-slices its whole result list on every __next__, so iterating it is
    # quadratic in the result's size (minutes for a count over 100k documents); take the list once.
    return iter(cursor._compute_results(with_limit_and_skip=True))
