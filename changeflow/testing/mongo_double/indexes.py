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
under those values, in natural order, and still tests each with mongomock's own filter, so answers,
order and errors are those of a scan. Documents whose value at the path cannot be keyed (an array
along the path, a date, a Decimal128, ...) are tested for every such filter. Any other filter scans,
as before. mongomock's unique-index check queries `{key: value}` per unique index, so it uses the
same lookups.

mongomock changes stored documents in place on update and then calls `_ensure_uniques`; that hook
re-indexes the document. `install()` routes mongomock's `_iter_documents` and `_ensure_uniques` here
for collections whose store is an `IndexedCollectionStore`; every other mongomock collection (a
transaction's private copy, other users of mongomock in the process) behaves exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import mongomock
import mongomock.collection
import mongomock.store
from bson import ObjectId
from mongomock.filtering import filter_applies
from mongomock.helpers import hashdict

# A document whose value at an indexed path cannot be keyed: tested for every lookup on that path.
_ANY = None
_SIMPLE = (str, int, float, ObjectId)  # int includes bool and Int64: equal values share a hash


def _simple(value: Any) -> bool:
    return isinstance(value, _SIMPLE) and not (isinstance(value, float) and math.isnan(value))


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
            if _simple(item):
                found.add(item)
            elif not (item is None or isinstance(item, dict)):
                return _ANY
        return found
    if _simple(value):
        return {value}
    if value is None or isinstance(value, dict):
        return set()
    return _ANY


def query_values(condition: Any) -> list[Any] | None:
    """The values an equality condition on one path accepts, or None if it is not such a condition."""
    if _simple(condition):
        return [condition]
    if not isinstance(condition, dict) or len(condition) != 1:
        return None
    op, arg = next(iter(condition.items()))
    if op == "$eq" and _simple(arg):
        return [arg]
    if op == "$in" and isinstance(arg, list) and all(_simple(v) for v in arg):
        return list(arg)
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
    def __getitem__(self, col_name: str) -> mongomock.store.CollectionStore:
        try:
            return self._collections[col_name]
        except KeyError:
            col = self._collections[col_name] = IndexedCollectionStore(col_name)
            return col

    def rename(self, name: str, new_name: str) -> None:
        # Not `pop(...) or ...`: an empty collection store is falsy (it has a length).
        col = self._collections.pop(name, None)
        if col is None:
            col = IndexedCollectionStore(new_name)
        col.name = new_name
        self._collections[new_name] = col


class IndexedServerStore(mongomock.store.ServerStore):
    def __getitem__(self, db_name: str) -> mongomock.store.DatabaseStore:
        try:
            return self._databases[db_name]
        except KeyError:
            db = self._databases[db_name] = IndexedDatabaseStore()
            return db


def indexed_client() -> mongomock.MongoClient:
    """A mongomock client whose collections are indexed."""
    install()
    return mongomock.MongoClient(_store=IndexedServerStore())


_original_iter_documents = mongomock.collection.Collection._iter_documents
_original_ensure_uniques = mongomock.collection.Collection._ensure_uniques


def _iter_documents(self: mongomock.Collection, filter: Any) -> Iterator[Any]:
    store = self._store
    if isinstance(store, IndexedCollectionStore):
        docs = store.candidates(filter)
        if docs is not None:
            if not docs:
                filter_applies(filter, {})  # a bad filter fails as a scan would, matches or not
            return (doc for doc in docs if filter_applies(filter, doc))
    return _original_iter_documents(self, filter)


def _ensure_uniques(self: mongomock.Collection, new_data: Any) -> None:
    store = self._store
    if isinstance(store, IndexedCollectionStore):
        store.reindex_document(new_data)
    _original_ensure_uniques(self, new_data)


def install() -> None:
    """Route mongomock's document iteration and unique checks through the indexes (idempotent)."""
    mongomock.collection.Collection._iter_documents = _iter_documents  # type: ignore[method-assign]
    mongomock.collection.Collection._ensure_uniques = _ensure_uniques  # type: ignore[method-assign]
