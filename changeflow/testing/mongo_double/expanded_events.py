"""`showExpandedEvents`: the DDL events (create, createIndexes, dropIndexes, modify) and the fields
mongod adds with the option (collectionUUID, operationDescription, stateBeforeChange).

The events are logged for every stream, as mongod's oplog holds them; only streams opened with
`showExpandedEvents: true` see them (`ChangeStream.matches`). `prepare` runs on every batch of
records before the log stamps them, under the storage lock: it gives each record its collection's
UUID and puts a `create` event before the first write to a collection that was created implicitly
(by an insert, an upsert or createIndexes), as mongod logs one for such a collection too.
"""

from __future__ import annotations

from typing import Any

from bson import Binary

from changeflow.testing.mongo_double.storage import ChangeRecord, Store

# Events only a stream with showExpandedEvents sees (shardCollection needs a sharded cluster: never here).
EXPANDED_OPS = frozenset({"create", "createIndexes", "dropIndexes", "modify", "shardCollection"})
# Records whose collection no longer exists (or moved) when they are logged: they carry their UUID.
_NO_CREATE = frozenset({"create", "drop", "rename", "dropDatabase"})
ID_INDEX = {"v": 2, "key": {"_id": 1}, "name": "_id_"}


def prepare(store: Store, records: list[ChangeRecord]) -> list[ChangeRecord]:
    """The records with UUIDs, and a create event before the first write to a new collection."""
    out: list[ChangeRecord] = []
    for record in records:
        if record.view:
            out.append(record)  # a view has no UUID and no implicit create
            continue
        if record.coll is not None and record.op not in _NO_CREATE:
            meta = store.coll_meta(record.db, record.coll)
            if not meta.announced:
                meta.announced = True
                out.append(create_record(record.db, record.coll, meta.uuid, {}))
            if record.uuid is None:
                record.uuid = meta.uuid
        elif record.op == "create" and record.coll is not None:
            store.coll_meta(record.db, record.coll).announced = True
        out.append(record)
    return out


def create_record(db: str, coll: str, uuid: Any, options: dict[str, Any]) -> ChangeRecord:
    """mongod's create oplog entry: the collection's options, then its _id index."""
    return ChangeRecord("create", db, coll, uuid=uuid, description={**options, "idIndex": dict(ID_INDEX)})


def add_fields(doc: dict[str, Any], record: ChangeRecord) -> dict[str, Any]:
    """The event document with the expanded fields, in mongod's field order: collectionUUID after
    clusterTime, operationDescription after documentKey (where ns is), stateBeforeChange last."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        out[key] = value
        if key == "clusterTime" and record.uuid is not None and record.op != "dropDatabase":
            out["collectionUUID"] = Binary.from_uuid(record.uuid)
    if record.description is not None:
        at = "documentKey" if "documentKey" in out else ("to" if "to" in out else "ns")
        items = list(out.items())
        index = next(i for i, (key, _) in enumerate(items) if key == at) + 1
        items.insert(index, ("operationDescription", record.description))
        out = dict(items)
    if record.state_before is not None:
        out["stateBeforeChange"] = record.state_before
    return out


def index_spec(name: str, info: dict[str, Any]) -> dict[str, Any]:
    """An index as mongod logs it (and listIndexes shows it): v, key, name, then its options."""
    spec: dict[str, Any] = {"v": 2, "key": dict(info["key"]), "name": name}
    for option in ("unique", "sparse", "partialFilterExpression", "expireAfterSeconds"):
        if info.get(option) is not None and (option != "unique" or name != "_id_"):
            spec[option] = info[option]
    return spec
