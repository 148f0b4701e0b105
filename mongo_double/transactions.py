"""Multi-document transactions: writes buffered per (lsid, txnNumber), applied atomically at commit.

Inside a transaction, commands run against a private mongomock copy of each collection the
transaction touches (copied on first touch), so the transaction reads its own writes and unique
indexes are checked at the write. The write operations are also recorded; commitTransaction
replays them on the shared store under the global lock and publishes their change events together,
carrying lsid and txnNumber. A failed replay restores the touched collections and aborts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import mongomock

from mongo_double import storage
from mongo_double.changestreams import EventLog
from mongo_double.errors import DuplicateKey, MongoError
from mongo_double.storage import ChangeRecord, Store


class TxnView:
    """A storage.View over the transaction's private copies of collections."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.shadow = mongomock.MongoClient()
        self.loaded: set[tuple[str, str]] = set()

    def collection(self, db: str, name: str) -> mongomock.Collection:
        if (db, name) not in self.loaded:
            with self.store.lock:
                if self.store.exists(db, name):
                    storage.copy_collection(self.store.collection(db, name), self.shadow[db][name])
            self.loaded.add((db, name))
        return self.shadow[db][name]

    def exists(self, db: str, name: str) -> bool:
        if (db, name) in self.loaded:
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
            snapshot = {
                ns: list(self.store.collection(*ns).find()) if self.store.exists(*ns) else None
                for ns in touched
            }
            try:
                records = self._replay(txn)
            except MongoError:
                self._restore(snapshot)
                self.abort(txn)
                raise
            txn.state = "committed"
            self.log.append(records, lsid=txn.lsid, txn_number=txn.txn_number)

    def _replay(self, txn: Transaction) -> list[ChangeRecord]:
        records: list[ChangeRecord] = []
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
            if errors:
                err = errors[0]
                if err["code"] == 11000:
                    raise DuplicateKey(ns, " (at commit)")
                raise MongoError(err["code"], err["errmsg"])
            records.extend(recs)
        return records

    def _restore(self, snapshot: dict[tuple[str, str], list[dict[str, Any]] | None]) -> None:
        for (db, coll), docs in snapshot.items():
            c = self.store.collection(db, coll)
            if docs is None:
                c.drop()
                continue
            c.delete_many({})
            if docs:
                c.insert_many(docs)
