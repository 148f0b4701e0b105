"""`local.oplog.rs` as mongod shows it, read from the change-event log (changestreams.EventLog).

Operators and monitoring read the oplog window from it: the oldest entry is
`find("oplog.rs", sort={$natural: 1}, limit=1)` in database `local`, the newest the same with -1
(what mongosh's rs.printReplicationInfo() does). Entries have mongod's fields: `op` (i, u, d, c, n),
`ns`, `o`, `o2`, `ts`, `t`, `v`, `wall`. While nothing was trimmed, the first entry is the set's
"initiating set" no-op, as on a fresh replica set. Update entries carry the change's update
description as a `$v: 2` diff (`u`: fields set, `d`: fields removed), not mongod's nested diff format.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from bson import Int64
from mongomock.filtering import filter_applies

from changeflow.testing.mongo_double.changestreams import Event, EventLog
from changeflow.testing.mongo_double.errors import MongoError

DB = "local"
COLLECTION = "oplog.rs"
_TERM = Int64(1)
_VERSION = Int64(2)


def is_oplog(db: str, coll: str) -> bool:
    return db == DB and coll == COLLECTION


def entry(event: Event) -> dict[str, Any]:
    """The oplog entry of one change event."""
    record = event.record
    ns = f"{record.db}.{record.coll}" if record.coll else f"{record.db}.$cmd"
    doc: dict[str, Any] = {"op": "c", "ns": ns, "o": {}}
    if record.view:
        doc = _view_entry(record)
    elif record.op == "insert":
        doc = {"op": "i", "ns": ns, "o": record.full_document or {}, "o2": record.document_key or {}}
    elif record.op in ("update", "replace"):
        if record.op == "replace" or record.update_description is None:
            body = record.full_document or {}
        else:
            desc = record.update_description
            diff: dict[str, Any] = {}
            if desc.get("updatedFields"):
                diff["u"] = desc["updatedFields"]
            if desc.get("removedFields"):
                diff["d"] = {name: False for name in desc["removedFields"]}
            body = {"$v": 2, "diff": diff}
        doc = {"op": "u", "ns": ns, "o": body, "o2": record.document_key or {}}
    elif record.op == "delete":
        doc = {"op": "d", "ns": ns, "o": record.document_key or {}}
    elif record.op == "drop":
        doc["o"] = {"drop": record.coll}
    elif record.op == "dropDatabase":
        doc["o"] = {"dropDatabase": 1}
    elif record.op == "rename":
        doc["o"] = {"renameCollection": ns, "to": ".".join((record.to or {}).values())}
    elif record.op in ("create", "createIndexes", "dropIndexes", "modify"):
        doc = {"op": "c", "ns": f"{record.db}.$cmd", **_ddl(record)}
    return {**doc, "ts": event.ts, "t": _TERM, "v": _VERSION, "wall": event.wall}


def _view_entry(record: Any) -> dict[str, Any]:
    """A view's create / collMod / drop: mongod's write to its database's system.views."""
    ns, key = f"{record.db}.system.views", {"_id": f"{record.db}.{record.coll}"}
    if record.op == "create":
        return {"op": "i", "ns": ns, "o": {**key, **(record.description or {})}, "o2": key}
    if record.op == "modify":
        return {"op": "u", "ns": ns, "o": {**key, **(record.description or {})}, "o2": key}
    return {"op": "d", "ns": ns, "o": key}


def _ddl(record: Any) -> dict[str, Any]:
    """o (and o2) of a DDL entry, as mongod logs the command (an index build over documents commits
    all its indexes in one commitIndexBuild entry)."""
    description = record.description or {}
    if record.op == "create":
        return {"o": {"create": record.coll, **description}}
    if record.op == "modify":
        before = (record.state_before or {}).get("collectionOptions", {})
        return {"o": {"collMod": record.coll, **description}, "o2": {"collectionOptions_old": before}}
    indexes = description.get("indexes") or [{}]
    if record.op == "dropIndexes":
        return {"o": {"dropIndexes": record.coll, "index": indexes[0].get("name")}, "o2": indexes[0]}
    if len(indexes) == 1:
        return {"o": {"createIndexes": record.coll, **indexes[0]}}
    return {"o": {"commitIndexBuild": record.coll, "indexes": indexes}}


def _initiating(log: EventLog) -> dict[str, Any]:
    return {
        "op": "n",
        "ns": "",
        "o": {"msg": "initiating set"},
        "ts": log.started_ts,
        "t": _TERM,
        "v": _VERSION,
        "wall": log.started_wall,
    }


def _entries(log: EventLog, newest_first: bool) -> Iterator[dict[str, Any]]:
    with log.cond:  # a snapshot: writers append while we read
        events = list(log.events)
        initiating = [_initiating(log)] if log.trimmed_seq == 0 else []
    if newest_first:
        return itertools.chain((entry(e) for e in reversed(events)), initiating)
    return itertools.chain(initiating, (entry(e) for e in events))


def _project(doc: dict[str, Any], projection: dict[str, Any] | None) -> dict[str, Any]:
    if not projection:
        return doc
    included = {name for name, flag in projection.items() if flag}
    if included:
        return {name: value for name, value in doc.items() if name in included}
    return {name: value for name, value in doc.items() if name not in projection}


def find(log: EventLog, cmd: dict[str, Any]) -> list[dict[str, Any]]:
    """The documents of a find on local.oplog.rs: filter, projection, {$natural: ±1} sort, skip, limit."""
    sort = cmd.get("sort") or {}
    if set(sort) - {"$natural"}:
        raise MongoError(
            115, "the MongoDB test server sorts local.oplog.rs by {$natural: 1} or {$natural: -1} only"
        )
    newest_first = sort.get("$natural", 1) < 0
    query = cmd.get("filter") or {}
    skip = int(cmd.get("skip") or 0)
    limit = abs(int(cmd.get("limit") or 0))
    matching: Iterable[dict[str, Any]] = (
        doc for doc in _entries(log, newest_first) if not query or filter_applies(query, doc)
    )
    selected = itertools.islice(matching, skip, skip + limit if limit else None)
    return [_project(doc, cmd.get("projection")) for doc in selected]
