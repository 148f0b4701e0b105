"""Multi-document transactions: writes buffered per (lsid, txnNumber), applied atomically at commit.

Inside a transaction, commands run against a private mongomock collection per collection the
transaction touches. It starts with the shared collection's indexes and no documents; every
operation first pulls from the shared store the documents it can see (those matching its filter,
found by _id when the filter names it), so the transaction reads its own writes, unique indexes are
checked at the write, and the cost follows what the transaction touches, not the collection's size.
A document the transaction has read or written is never pulled again. The write operations are also
recorded; commitTransaction replays them on the shared store under the global lock and publishes
their change events together, carrying lsid and txnNumber. A failed replay undoes what it applied,
using the pre-images of its change records, and aborts.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

import bson
import mongomock
import pymongo.errors

from changeflow.testing.mongo_double import indexes, storage
from changeflow.testing.mongo_double.changestreams import EventLog
from changeflow.testing.mongo_double.errors import DuplicateKey, MongoError
from changeflow.testing.mongo_double.storage import ChangeRecord, Store


def _id_key(_id: Any) -> Any:
    """An _id as a set member, the way mongomock keys its documents."""
    return mongomock.helpers.hashdict(_id) if isinstance(_id, dict) else _id


def _id_candidates(query: Any) -> list[Any] | None:
    """The only _ids a filter can match when it pins `_id` to values, else None (any document)."""
    if not isinstance(query, dict) or "_id" not in query:
        return None
    value = query["_id"]
    if isinstance(value, dict) and any(k.startswith("$") for k in value):
        if set(value) == {"$eq"}:
            values = [value["$eq"]]
        elif set(value) == {"$in"} and isinstance(value["$in"], list):
            values = value["$in"]
        else:
            return None
    else:
        values = [value]
    if any(isinstance(v, list | re.Pattern | bson.Regex) for v in values):
        return None
    return values


class TxnCollection:
    """One collection as a transaction sees it: a private mongomock collection with the shared
    collection's indexes, holding the documents the transaction has read or written so far.

    Each operation pulls the shared documents it may see before running on the private collection
    (an operation this class does not know, e.g. aggregate, pulls them all). `known` holds the _ids
    whose transaction version is in the private collection, present or deleted there."""

    _PASS_THROUGH = frozenset({"name", "full_name", "database", "_store", "index_information"})

    def __init__(self, store: Store, db: str, name: str, private: mongomock.Collection) -> None:
        self.store, self.db, self.name = store, db, name
        self.private = private
        self.known: set[Any] = set()
        self.complete = False  # every shared document has been pulled
        with store.lock:
            if store.exists(db, name):
                private.database.create_collection(name)
                storage.copy_indexes(store.collection(db, name), private)
        self.unique_keys = [
            [k for k, _ in info["key"]]
            for info in private.index_information().values()
            if info.get("unique") and [k for k, _ in info["key"]] != ["_id"]
        ]

    def _pull(self, query: Any) -> None:
        """Copy the shared documents matching `query` (a superset is fine) that are not known yet."""
        if self.complete:
            return
        with self.store.lock:
            if not self.store.exists(self.db, self.name):
                return
            shared = self.store.collection(self.db, self.name)
            ids = _id_candidates(query)
            if ids is None:
                docs = list(shared.find(query or {}))
                self.complete = not query
            else:
                docs = [storage.by_id(shared, _id) for _id in ids if _id_key(_id) not in self.known]
            for doc in docs:
                if doc is None or _id_key(doc["_id"]) in self.known:
                    continue
                self.known.add(_id_key(doc["_id"]))
                try:
                    self.private.insert_one(doc)
                except pymongo.errors.DuplicateKeyError:
                    # Committed after this transaction wrote the same unique key: mongod's answer.
                    raise MongoError(
                        112,
                        f"WriteConflict: {self.db}.{self.name} changed during the transaction",
                        labels=["TransientTransactionError"],
                    ) from None

    def find(self, filter: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._pull(filter)
        return self.private.find(filter, *args, **kwargs)

    def find_one(self, filter: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._pull(filter)
        return self.private.find_one(filter, *args, **kwargs)

    def count_documents(self, filter: Any, **kwargs: Any) -> int:
        self._pull(filter)
        return self.private.count_documents(filter, **kwargs)

    def distinct(self, key: str, filter: Any = None, **kwargs: Any) -> Any:
        self._pull(filter)
        return self.private.distinct(key, filter, **kwargs)

    def insert_one(self, doc: dict[str, Any], **kwargs: Any) -> Any:
        # What a unique index compares the new document with (mongomock's own check, by value).
        if "_id" in doc:
            self._pull({"_id": doc["_id"]})
        for keys in self.unique_keys:
            self._pull({k: self._value(doc, k) for k in keys})
        result = self.private.insert_one(doc, **kwargs)
        self.known.add(_id_key(result.inserted_id))
        return result

    @staticmethod
    def _value(doc: dict[str, Any], path: str) -> Any:
        try:
            return mongomock.helpers.get_value_by_dot(doc, path)
        except KeyError:
            return None

    def _modify(self, method: str, filter: Any, update: Any, **kwargs: Any) -> Any:
        if self.unique_keys:
            self._pull({})  # the new values could clash with any document
        self._pull(filter)
        if isinstance(update, dict) and "_id" in update:
            self._pull({"_id": update["_id"]})  # a replacement (or upsert) naming its _id
        result = getattr(self.private, method)(filter, update, **kwargs)
        if result.upserted_id is not None:
            self.known.add(_id_key(result.upserted_id))
        return result

    def update_one(self, filter: Any, update: Any, **kwargs: Any) -> Any:
        return self._modify("update_one", filter, update, **kwargs)

    def replace_one(self, filter: Any, replacement: Any, **kwargs: Any) -> Any:
        return self._modify("replace_one", filter, replacement, **kwargs)

    def delete_one(self, filter: Any, **kwargs: Any) -> Any:
        self._pull(filter)
        return self.private.delete_one(filter, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        # Anything else (aggregate, ...) sees the whole collection, as a full private copy would.
        if attr not in self._PASS_THROUGH:
            self._pull({})
        return getattr(self.private, attr)


class TxnView:
    """A storage.View over the transaction's private collections (TxnCollection)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Indexed like the shared store, so filters compare numbers as the shared collections do.
        self.shadow = indexes.indexed_client()
        self.collections: dict[tuple[str, str], TxnCollection] = {}

    def collection(self, db: str, name: str) -> TxnCollection:
        coll = self.collections.get((db, name))
        if coll is None:
            coll = self.collections[(db, name)] = TxnCollection(self.store, db, name, self.shadow[db][name])
        return coll

    def exists(self, db: str, name: str) -> bool:
        if (db, name) in self.collections:
            return name in self.shadow[db].list_collection_names()
        return self.store.exists(db, name)

    def images_enabled(self, db: str, name: str) -> bool:
        return self.store.images_enabled(db, name)


@dataclass
class Transaction:
    lsid: dict[str, Any]
    txn_number: int
    view: TxnView
    state: str = "active"  # active, committed, aborted
    ops: list[tuple[str, str, str, Any]] = field(default_factory=list)


def lsid_key(lsid: dict[str, Any]) -> bytes:
    return bytes(lsid.get("id", b""))


class Transactions:
    def __init__(self, store: Store, log: EventLog) -> None:
        self.store = store
        self.log = log
        self._lock = threading.Lock()
        self._by_session: dict[bytes, Transaction] = {}

    def resolve(
        self, cmd_name: str, lsid: dict[str, Any] | None, txn_number: int, start: bool
    ) -> Transaction:
        """The transaction a command with autocommit:false belongs to (starting it if asked)."""
        if lsid is None:
            raise MongoError(50768, "Transaction requires a session (lsid)")
        key = lsid_key(lsid)
        with self._lock:
            current = self._by_session.get(key)
            if start:
                if current is not None and current.txn_number >= txn_number and current.state != "aborted":
                    raise MongoError(
                        225,
                        f"Cannot start transaction {txn_number} on session because a newer "
                        "transaction has already started",
                        labels=[],
                    )
                txn = Transaction(lsid, txn_number, TxnView(self.store))
                self._by_session[key] = txn
                return txn
            if (
                current is None
                or current.txn_number != txn_number
                or (current.state == "aborted" and cmd_name != "abortTransaction")
            ):
                raise MongoError(
                    251,
                    f"Transaction with {{ txnNumber: {txn_number} }} has been aborted.",
                    labels=["TransientTransactionError"],
                )
            if current.state == "committed" and cmd_name not in ("commitTransaction", "abortTransaction"):
                raise MongoError(256, f"Transaction {txn_number} has been committed.")
            return current

    def abort(self, txn: Transaction) -> None:
        txn.state = "aborted"
        txn.ops.clear()

    def end_sessions(self, lsids: list[dict[str, Any]]) -> None:
        with self._lock:
            for lsid in lsids:
                txn = self._by_session.pop(lsid_key(lsid), None)
                if txn is not None and txn.state == "active":
                    self.abort(txn)

    def commit(self, txn: Transaction) -> None:
        if txn.state == "committed":
            return  # a retried commit succeeds again, as on mongod
        if txn.state == "aborted":
            raise MongoError(251, "Transaction has been aborted.", labels=["TransientTransactionError"])
        with self.store.lock:
            touched = {(db, coll) for _, db, coll, _ in txn.ops}
            created = {ns for ns in touched if not self.store.exists(*ns)}
            records: list[ChangeRecord] = []
            try:
                self._replay(txn, records)
            except Exception:
                self._undo(records, created)
                self.abort(txn)
                raise
            txn.state = "committed"
            self.log.append(records, lsid=txn.lsid, txn_number=txn.txn_number)

    def _replay(self, txn: Transaction, records: list[ChangeRecord]) -> None:
        """Apply the transaction's writes to the shared store, appending a record per applied change
        (also those of an operation that then fails), which is what _undo needs."""
        for kind, db, coll, args in txn.ops:
            ns = f"{db}.{coll}"
            if kind == "insert":
                _, errors, recs = storage.insert(self.store, db, coll, args, ordered=True)
            elif kind == "update":
                reply, recs = storage.update(self.store, db, coll, args, ordered=True)
                errors = reply.get("writeErrors", [])
            elif kind == "delete":
                _, errors, recs = storage.delete(self.store, db, coll, args, ordered=True)
            elif kind == "findAndModify":
                try:
                    _, recs = storage.find_and_modify(self.store, db, coll, args)
                except Exception as exc:
                    raise storage.map_exception(exc, ns) from exc
                errors = []
            else:  # create
                if not self.store.exists(db, coll):
                    self.store.client[db].create_collection(coll)
                recs, errors = [], []
            records.extend(recs)
            if errors:
                err = errors[0]
                if err["code"] == 11000:
                    raise DuplicateKey(ns, " (at commit)")
                raise MongoError(err["code"], err["errmsg"])

    def _undo(self, records: list[ChangeRecord], created: set[tuple[str, str]]) -> None:
        """Revert applied changes, newest first, and drop the collections the replay created."""
        for rec in reversed(records):
            c = self.store.collection(rec.db, rec.coll)
            key = {"_id": rec.document_key["_id"]}
            if rec.op == "insert":
                c.delete_one(key)
            elif rec.op == "delete":
                c.insert_one(rec.pre_image)
            else:  # update, replace
                c.replace_one(key, rec.pre_image)
        for db, coll in created:
            self.store.collection(db, coll).drop()
