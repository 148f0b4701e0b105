"""Indexes of the shared store: queries that pin `_id` or an indexed field do not scan the collection.

mongomock answers every query by testing every document of the collection with its filter
(`Collection._iter_documents`), and checks unique indexes that way after every insert and update,
so the server's throughput fell as collections grew. Here each collection of the shared store keeps
(`IndexedCollectionStore`):

- the natural-order position of every document (mongomock's documents dict, keyed by `_id`, keeps
  insertion order; a replaced document keeps its place);
- for `_id` and every field path named in an index key (`createIndexes`), a map from value to the
  documents holding it (every element, for an array).

A filter that pins one of those paths to simple values (`{f: v}`, `{f: {$eq: v}}`, `{f: {$in: [...]}}`,
also inside a top-level `$and`; values: strings, numbers, booleans, ObjectIds) reads only the documents
under those values, in natural order, and still tests each with the server's filter (mongomock's, with
numbers compared by value: numeric.py), so answers, order and errors are those of a scan. Numbers are
filed by value (int, long, double and Decimal128 alike), so a lookup by 10 finds Decimal128("10.0").
Documents whose value at the path cannot be keyed (an array along the path, a date, a NaN, ...) are
tested for every such filter. Any other filter scans, as before. mongomock's unique-index check
queries `{key: value}` per unique index, so it uses the same lookups.

The same patched iteration matches every find, count, distinct, update, delete and findAndModify of
the shared store and of transactions' private copies by numbers' values; sorts order keys as mongod
does (`_get_dataset`), and `aggregate` runs its `$match` stages through the same matcher (a leading
one as the find that reads the collection, so it uses the indexes).

mongomock changes stored documents in place on update and then calls `_ensure_uniques`; that hook
re-indexes the document. `install()` routes mongomock's `_iter_documents`, `_ensure_uniques`,
`_get_dataset` and `aggregate` here for collections whose store is an `IndexedCollectionStore`; every
other mongomock collection (other users of mongomock in the process) behaves exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import mongomock
import mongomock.aggregate
import mongomock.collection
import mongomock.command_cursor
import mongomock.store
from bson import Decimal128, ObjectId
from mongomock import filtering
from mongomock.helpers import hashdict, patch_datetime_awareness_in_document

from changeflow.testing.mongo_double import numeric

# A document whose value at an indexed path cannot be keyed: tested for every lookup on that path.
_ANY = None
_SIMPLE = (str, int, float, ObjectId)  # int includes bool and Int64
_NO_KEY = object()


def _key(value: Any) -> Any:
    """The key a value is filed under, or _NO_KEY. Numbers are keyed by value (a Decimal128 as
    decimal.Decimal): Python's equal numbers of any type are equal keys with one hash, as mongod's
    numbers of any type are equal by value (numeric.py)."""
    if isinstance(value, Decimal128):
        number = value.to_decimal()
        return _NO_KEY if number.is_nan() else number
    if isinstance(value, _SIMPLE) and not (isinstance(value, float) and math.isnan(value)):
        return value
    return _NO_KEY


def _doc_key(_id: Any) -> Any:
    """The key mongomock stores a document under."""
    return hashdict(_id) if isinstance(_id, dict) else _id


def document_values(doc: Any, parts: list[str]) -> set[Any] | None:
    """The values an equality filter on this path can match in `doc`; None: any (test it always).

    A missing path, null, or a sub-document at the path gives no value (no simple value equals them).
    """
    value = doc
    for part in parts:
        if isinstance(value, dict):
            if part not in value:
                return set()
            value = value[part]
        elif isinstance(value, list):
            return _ANY  # arrays along the path: mongomock matches elements and positions
        else:
            return set()
    if isinstance(value, list):
        found: set[Any] = set()
        for item in value:
            key = _key(item)
            if key is not _NO_KEY:
                found.add(key)
            elif not (item is None or isinstance(item, dict)):
                return _ANY
        return found
    key = _key(value)
    if key is not _NO_KEY:
        return {key}
    if value is None or isinstance(value, dict):
        return set()
    return _ANY


def query_values(condition: Any) -> list[Any] | None:
    """The keys of the values an equality condition on one path accepts, or None if it is not such a
    condition."""
    key = _key(condition)
    if key is not _NO_KEY:
        return [key]
    if not isinstance(condition, dict) or len(condition) != 1:
        return None
    op, arg = next(iter(condition.items()))
    if op == "$eq" and (key := _key(arg)) is not _NO_KEY:
        return [key]
    if op == "$in" and isinstance(arg, list):
        keys = [_key(v) for v in arg]
        return None if _NO_KEY in keys else keys
    return None


class PathIndex:
    """value -> keys of the documents holding it, for one field path."""

    def __init__(self, path: str) -> None:
        self.parts = path.split(".")
        self.by_value: dict[Any, set[Any]] = {}
        self.any: set[Any] = set()  # documents whose value cannot be keyed
        self.entries: dict[Any, set[Any] | None] = {}  # document key -> what it is filed under

    def add(self, key: Any, doc: Any) -> None:
        self.remove(key)
        values = document_values(doc, self.parts)
        self.entries[key] = values
        if values is _ANY:
            self.any.add(key)
            return
        for value in values:
            self.by_value.setdefault(value, set()).add(key)

    def remove(self, key: Any) -> None:
        if key not in self.entries:
            return
        values = self.entries.pop(key)
        if values is _ANY:
            self.any.discard(key)
            return
        for value in values:
            bucket = self.by_value.get(value)
            if bucket is not None:
                bucket.discard(key)
                if not bucket:
                    del self.by_value[value]

    def lookup(self, values: Iterable[Any]) -> set[Any]:
        found = set(self.any)
        for value in values:
            found |= self.by_value.get(value, set())
        return found


class IndexedCollectionStore(mongomock.store.CollectionStore):
    """mongomock's collection store, plus natural-order positions and per-path value indexes."""

    def __init__(self, name: str) -> None:
        self._positions: dict[Any, int] = {}
        self._next_position = 0
        self._paths: dict[str, PathIndex] = {"_id": PathIndex("_id")}
        self._index_specs: dict[str, Any] = {}
        super().__init__(name)

    # mongomock assigns `indexes` as a whole (drop_indexes) besides create_index / drop_index.
    @property  # type: ignore[override]
    def indexes(self) -> dict[str, Any]:
        return self._index_specs

    @indexes.setter
    def indexes(self, value: dict[str, Any]) -> None:
        self._index_specs = value
        self._sync_paths()

    def create_index(self, index_name: str, index_dict: dict[str, Any]) -> None:
        super().create_index(index_name, index_dict)
        self._sync_paths()

    def drop_index(self, index_name: str) -> None:
        super().drop_index(index_name)
        self._sync_paths()

    def _sync_paths(self) -> None:
        wanted = {"_id"} | {
            path
            for spec in self._index_specs.values()
            for path, _ in spec.get("key", [])
            if isinstance(path, str) and "$" not in path
        }
        for path in set(self._paths) - wanted:
            del self._paths[path]
        for path in wanted - set(self._paths):
            index = self._paths[path] = PathIndex(path)
            for key, doc in self._documents.items():
                index.add(key, doc)

    def __setitem__(self, key: Any, val: Any) -> None:
        super().__setitem__(key, val)
        if key not in self._positions:
            self._positions[key] = self._next_position
            self._next_position += 1
        self.reindex(key, val)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._positions.pop(key, None)
        for index in self._paths.values():
            index.remove(key)

    def drop(self) -> None:
        super().drop()
        self._positions.clear()
        self._paths = {"_id": PathIndex("_id")}

    def reindex(self, key: Any, doc: Any) -> None:
        for index in self._paths.values():
            index.add(key, doc)

    def reindex_document(self, doc: Any) -> None:
        """After mongomock changed a stored document in place."""
        if not isinstance(doc, dict) or "_id" not in doc:
            return
        key = _doc_key(doc["_id"])
        if self._documents.get(key) is doc:
            self.reindex(key, doc)

    def candidates(self, query: Any) -> list[Any] | None:
        """The stored documents `query` can match, in natural order; None: the query needs a scan."""
        keys = self._candidate_keys(query)
        if keys is None:
            return None
        if self._ttl_indexes:
            self._remove_expired_documents()
        documents = self._documents
        ordered = sorted((k for k in keys if k in documents), key=self._positions.__getitem__)
        return [documents[k] for k in ordered]

    def _candidate_keys(self, query: Any) -> set[Any] | None:
        if not isinstance(query, dict):
            return None
        best: set[Any] | None = None
        for path, condition in query.items():
            if path == "$and" and isinstance(condition, list):
                found = None
                for part in condition:
                    keys = self._candidate_keys(part)
                    if keys is not None and (found is None or len(keys) < len(found)):
                        found = keys
            else:
                index = self._paths.get(path)
                values = query_values(condition) if index is not None else None
                found = index.lookup(values) if index is not None and values is not None else None
            if found is not None and (best is None or len(found) < len(best)):
                best = found
        return best


class IndexedDatabaseStore(mongomock.store.DatabaseStore):
    collection_class: type[IndexedCollectionStore] = IndexedCollectionStore

    def __getitem__(self, col_name: str) -> mongomock.store.CollectionStore:
        try:
            return self._collections[col_name]
        except KeyError:
            col = self._collections[col_name] = self.collection_class(col_name)
            return col

    def rename(self, name: str, new_name: str) -> None:
        # Not `pop(...) or ...`: an empty collection store is falsy (it has a length).
        col = self._collections.pop(name, None)
        if col is None:
            col = IndexedCollectionStore(new_name)
        col.name = new_name
        self._collections[new_name] = col


class IndexedServerStore(mongomock.store.ServerStore):
    database_class: type[IndexedDatabaseStore] = IndexedDatabaseStore

    def __getitem__(self, db_name: str) -> mongomock.store.DatabaseStore:
        try:
            return self._databases[db_name]
        except KeyError:
            db = self._databases[db_name] = self.database_class()
            return db


def indexed_client() -> mongomock.MongoClient:
    """A mongomock client whose collections are indexed."""
    install()
    return mongomock.MongoClient(_store=IndexedServerStore())


_original_iter_documents = mongomock.collection.Collection._iter_documents
_original_ensure_uniques = mongomock.collection.Collection._ensure_uniques
_original_get_dataset = mongomock.collection.Collection._get_dataset
_original_aggregate = mongomock.collection.Collection.aggregate


def _iter_documents(self: mongomock.Collection, filter: Any) -> Iterator[Any]:
    store = self._store
    if not isinstance(store, IndexedCollectionStore):
        return _original_iter_documents(self, filter)
    spec = numeric.query(filter)  # numbers of every type compared by value, as mongod does
    docs = store.candidates(filter)
    if docs is None:
        docs = list(store.documents)
    if not docs:
        numeric.matches(spec, {})  # a bad filter fails as a scan would, matches or not
    return (doc for doc in docs if numeric.matches(spec, doc))


def _sort_key(path: str) -> Any:
    def key(doc: Any) -> tuple[int, numeric.SortKey]:
        rank, value = filtering.resolve_sort_key(path, doc)
        return rank, numeric.SortKey(value.obj)

    return key


def _get_dataset(
    self: mongomock.Collection, spec: Any, sort: Any, fields: Any, as_class: Any
) -> Iterator[Any]:
    """mongomock's, with sort keys ordered as mongod orders them (numbers of every type by value)."""
    if not isinstance(self._store, IndexedCollectionStore) or not sort:
        yield from _original_get_dataset(self, spec, sort, fields, as_class)
        return
    dataset: Iterable[Any] = self._iter_documents(spec)
    for path, direction in reversed(list(sort.items() if isinstance(sort, dict) else sort)):
        if path == "$natural":
            if direction < 0:
                dataset = list(reversed(list(dataset)))
            continue
        if path.startswith("$"):
            raise NotImplementedError(f"Sorting by {path} is not implemented in mongomock yet")
        dataset = sorted(dataset, key=_sort_key(path), reverse=direction < 0)
    for document in dataset:
        yield self._copy_only_fields(document, fields, as_class)


def _ensure_uniques(self: mongomock.Collection, new_data: Any) -> None:
    store = self._store
    if isinstance(store, IndexedCollectionStore):
        store.reindex_document(new_data)
    _original_ensure_uniques(self, new_data)


def _aggregate(self: mongomock.Collection, pipeline: Any, session: Any = None, **kwargs: Any) -> Any:
    """mongomock's aggregate, with `$match` stages matched as find filters are (numbers of every type
    by value); a leading `$match` is the find that reads the collection, so it uses the indexes."""
    if not isinstance(self._store, IndexedCollectionStore) or not isinstance(pipeline, list):
        return _original_aggregate(self, pipeline, session, **kwargs)
    stages = list(pipeline)
    first: Any = {}
    if stages and isinstance(stages[0], dict) and list(stages[0]) == ["$match"]:
        first = stages.pop(0)["$match"]
    docs: list[Any] = list(self.find(first))
    segment: list[Any] = []
    for stage in [*stages, None]:
        if stage is not None and not (isinstance(stage, dict) and list(stage) == ["$match"]):
            segment.append(stage)
            continue
        if segment:
            docs = list(mongomock.aggregate.process_pipeline(docs, self.database, segment, session))
            segment = []
        if stage is not None:
            spec = numeric.query(patch_datetime_awareness_in_document(stage["$match"]))
            docs = [doc for doc in docs if numeric.matches(spec, patch_datetime_awareness_in_document(doc))]
    return mongomock.command_cursor.CommandCursor(docs)


def install() -> None:
    """Route mongomock's document iteration and unique checks through the indexes (idempotent)."""
    mongomock.collection.Collection._iter_documents = _iter_documents  # type: ignore[method-assign]
    mongomock.collection.Collection._ensure_uniques = _ensure_uniques  # type: ignore[method-assign]
    mongomock.collection.Collection._get_dataset = _get_dataset  # type: ignore[method-assign]
    mongomock.collection.Collection.aggregate = _aggregate  # type: ignore[method-assign]
