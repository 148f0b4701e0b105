"""Command dispatch: command name -> handler, plus what every reply carries.

`Context` is the server's shared state; `Connection` what a handler may need about its client.
Handlers take (ctx, conn, cmd, db, txn) and return the reply fields; errors are MongoError.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mongomock
from bson import Binary, Int64, ObjectId
from mongomock.filtering import filter_applies

from changeflow.testing.mongo_double import changestreams, expanded_events, oplog, storage, views
from changeflow.testing.mongo_double.changestreams import ChangeStream, EventLog
from changeflow.testing.mongo_double.cursors import DEFAULT_FIRST_BATCH, CursorTable, ResultCursor
from changeflow.testing.mongo_double.errors import (
    BSON_MAX_USER_SIZE,
    BSON_OBJECT_TOO_LARGE,
    NON_RESUMABLE_CHANGE_STREAM_CODES,
    RESUMABLE_CHANGE_STREAM_CODES,
    RETRYABLE_WRITE_CODES,
    CloseConnection,
    MongoError,
    command_not_found,
)
from changeflow.testing.mongo_double.failpoints import FailPoints
from changeflow.testing.mongo_double.storage import ChangeRecord, Store
from changeflow.testing.mongo_double.transactions import Transaction, Transactions
from changeflow.testing.mongo_double.wire import COMPRESSORS

Command = dict[str, Any]  # a command document as received (first key: the command name)
Reply = dict[str, Any]  # reply fields; dispatch() adds ok, operationTime and $clusterTime

SET_NAME = "rs0"
MAX_WIRE_VERSION = 21  # MongoDB 7.0
VERSION = "7.0.0"
ELECTION_ID = ObjectId("7fffffff0000000000000001")  # constant: a changing electionId makes drivers rediscover
# Envelope fields drivers add to every command; none of them changes what the command does here.
ENVELOPE = (
    "$db",
    "lsid",
    "$clusterTime",
    "$readPreference",
    "txnNumber",
    "autocommit",
    "startTransaction",
    "readConcern",
    "writeConcern",
    "comment",
    "apiVersion",
    "apiStrict",
    "apiDeprecationErrors",
    "maxTimeMS",
    "$audit",
    "mayBypassWriteBlocking",
)
WRITE_COMMANDS = frozenset({"insert", "update", "delete", "findAndModify"})
TXN_COMMANDS = frozenset(
    {
        "find",
        "getMore",
        "killCursors",
        "insert",
        "update",
        "delete",
        "findAndModify",
        "aggregate",
        "distinct",
        "count",
        "commitTransaction",
        "abortTransaction",
        "create",
        "listCollections",
        "listIndexes",
    }
)


@dataclass
class Connection:
    conn_id: int
    peer: str
    app_name: str | None = None


@dataclass
class Context:
    host: str
    port: int
    oplog_size: int
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    store: Store = field(default_factory=Store)
    cursors: CursorTable = field(default_factory=CursorTable)
    failpoints: FailPoints = field(default_factory=FailPoints)
    started: float = field(default_factory=time.time)
    connections: int = 0

    def __post_init__(self) -> None:
        self.log = EventLog(self.oplog_size)
        self.log.prepare = lambda records: expanded_events.prepare(self.store, records)
        self.txns = Transactions(self.store, self.log)

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"


Handler = Callable[[Context, Connection, dict[str, Any], str, Transaction | None], dict[str, Any]]
HANDLERS: dict[str, Handler] = {}


def command(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            HANDLERS[name] = fn
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# Dispatch


def dispatch(ctx: Context, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
    """Run one command; returns the full reply (ok, operationTime, $clusterTime included)."""
    name = next(iter(cmd))
    db = cmd.get("$db")
    txn: Transaction | None = None
    fp_labels: list[str] | None = None
    wc_error: dict[str, Any] | None = None
    try:
        if not isinstance(db, str) or not db:
            raise MongoError(40571, "OP_MSG requests require a $db argument")
        handler = HANDLERS.get(name)
        if name != "configureFailPoint":
            coll = cmd[name] if isinstance(cmd[name], str) else None
            data = ctx.failpoints.check("failCommand", name, conn.app_name, db, coll)
            if data is not None:
                wc_error = _fire_fail_point(data, name, cmd)
                fp_labels = data.get("errorLabels")
        if handler is None:
            raise command_not_found(name)
        if cmd.get("autocommit") is False and "txnNumber" in cmd:
            if name not in TXN_COMMANDS:
                raise MongoError(263, f"Cannot run '{name}' in a multi-document transaction.")
            txn = ctx.txns.resolve(
                name, cmd.get("lsid"), int(cmd["txnNumber"]), bool(cmd.get("startTransaction"))
            )
        reply = handler(ctx, conn, cmd, db, txn)
        reply.setdefault("ok", 1.0)
        if wc_error is not None:
            reply["writeConcernError"] = wc_error
    except MongoError as err:
        if txn is not None and txn.state == "active" and name not in ("commitTransaction",):
            ctx.txns.abort(txn)  # mongod aborts a transaction on any error inside it
        reply = err.to_doc()
        labels = fp_labels if fp_labels is not None else _error_labels(name, cmd, err, txn)
        if labels:
            reply["errorLabels"] = labels
        else:
            reply.pop("errorLabels", None)
    now = ctx.log.now()
    reply["operationTime"] = now
    reply["$clusterTime"] = {
        "clusterTime": now,
        "signature": {"hash": Binary(b"\x00" * 20), "keyId": Int64(0)},
    }
    return reply


def _fire_fail_point(data: dict[str, Any], name: str, cmd: dict[str, Any]) -> dict[str, Any] | None:
    """Act out a fired failCommand in mongod's order: block, close, error, writeConcernError."""
    if data.get("blockConnection"):
        time.sleep(int(data.get("blockTimeMS", 0)) / 1000)
    if data.get("closeConnection"):
        raise CloseConnection(f"failCommand closeConnection on {name}")
    if "errorCode" in data:
        raise MongoError(
            int(data["errorCode"]),
            "Failing command via 'failCommand' failpoint",
            labels=data.get("errorLabels"),
        )
    return data.get("writeConcernError")


def _error_labels(name: str, cmd: Command, err: MongoError, txn: Transaction | None) -> list[str]:
    """Labels as mongod adds them (errorLabels from a fail point replace these)."""
    labels = list(err.labels)
    if err.code in NON_RESUMABLE_CHANGE_STREAM_CODES and "NonResumableChangeStreamError" not in labels:
        labels.append("NonResumableChangeStreamError")
    retryable = err.code in RETRYABLE_WRITE_CODES
    if txn is not None and name not in ("commitTransaction", "abortTransaction"):
        # Inside a transaction single statements are not retried; the whole transaction is.
        if retryable and "TransientTransactionError" not in labels:
            labels.append("TransientTransactionError")
    elif (
        name in WRITE_COMMANDS | {"commitTransaction", "abortTransaction"}
        and "txnNumber" in cmd
        and retryable
        and "RetryableWriteError" not in labels
    ):
        labels.append("RetryableWriteError")
    return labels


def reply_cursor(
    ctx: Context, ns: str, docs: list[dict[str, Any]], batch_size: int | None, single_batch: bool = False
) -> dict[str, Any]:
    size = DEFAULT_FIRST_BATCH if batch_size is None else batch_size
    cursor = ResultCursor(ctx.cursors.new_id(), ns, docs)
    first = cursor.take(size if size > 0 else None) if size != 0 else []
    cursor_id = 0
    if not cursor.exhausted and not single_batch:
        ctx.cursors.add(cursor)
        cursor_id = cursor.cursor_id
    return {"cursor": {"firstBatch": first, "id": Int64(cursor_id), "ns": ns}}


def _view(ctx: Context, txn: Transaction | None) -> storage.View:
    return txn.view if txn is not None else ctx.store


def _coll_name(cmd: Command, name: str) -> str:
    value = cmd.get(name)
    if not isinstance(value, str) or not value:
        raise MongoError(73, f"collection name has invalid type {type(value).__name__}")
    return value


def _doc_list(cmd: Command, field: str) -> list[dict[str, Any]]:
    """A command's array of documents (documents, updates, deletes), type-checked like mongod does."""
    value = cmd.get(field) or []
    if not isinstance(value, list) or not all(isinstance(d, dict) for d in value):
        raise MongoError(14, f"BSON field '{next(iter(cmd))}.{field}' must be an array of objects")
    return value


def _run_write(
    ctx: Context,
    txn: Transaction | None,
    fn: Callable[[storage.View], tuple[dict[str, Any], list[ChangeRecord]]],
) -> dict[str, Any]:
    """Run a write on the store (publishing its events) or inside the transaction's view."""
    if txn is not None:
        reply, _ = fn(txn.view)
        return reply
    with ctx.store.lock:
        reply, records = fn(ctx.store)
        ctx.log.append(records)
    return reply


# ---------------------------------------------------------------------------------------------
# Handshake and server information


@command("hello", "ismaster", "isMaster")
def cmd_hello(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    client = cmd.get("client")
    if isinstance(client, dict):
        conn.app_name = (client.get("application") or {}).get("name")
    now = ctx.log.now()
    wall = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    # No topologyVersion on purpose: it would switch drivers to streaming (exhaust) monitoring.
    reply: dict[str, Any] = {}
    if next(iter(cmd)) == "hello":
        reply["isWritablePrimary"] = True
    else:
        reply["ismaster"] = True
    if cmd.get("helloOk"):
        reply["helloOk"] = True
    offered = cmd.get("compression")
    if isinstance(offered, list):  # mongod answers the compressors it shares with the client
        reply["compression"] = [name for name in offered if name in COMPRESSORS]
    reply.update(
        {
            "hosts": [ctx.host_port],
            "setName": SET_NAME,
            "setVersion": 1,
            "secondary": False,
            "primary": ctx.host_port,
            "me": ctx.host_port,
            "electionId": ELECTION_ID,
            "lastWrite": {
                "opTime": {"ts": now, "t": Int64(1)},
                "lastWriteDate": wall,
                "majorityOpTime": {"ts": now, "t": Int64(1)},
                "majorityWriteDate": wall,
            },
            "maxBsonObjectSize": BSON_MAX_USER_SIZE,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "localTime": wall,
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": conn.conn_id,
            "minWireVersion": 0,
            "maxWireVersion": MAX_WIRE_VERSION,
            "readOnly": False,
        }
    )
    return reply


@command("ping")
def cmd_ping(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    return {}


@command("buildInfo", "buildinfo")
def cmd_build_info(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    return {
        "version": VERSION,
        "versionArray": [7, 0, 0, 0],
        "gitVersion": "mongo_double",
        "bits": 64,
        "debug": False,
        "maxBsonObjectSize": BSON_MAX_USER_SIZE,
        "storageEngines": ["mongo_double"],
        "modules": [],
        "javascriptEngine": "none",
    }


@command("getParameter")
def cmd_get_parameter(
    ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None
) -> Reply:
    params: dict[str, Any] = {
        "enableTestCommands": True,
        "featureCompatibilityVersion": {"version": "7.0"},
        "transactionLifetimeLimitSeconds": 60,
        "requireApiVersion": False,
    }
    if cmd["getParameter"] in ("*", {"allParameters": True}):
        return params
    return {k: v for k, v in params.items() if k in cmd}


@command("getCmdLineOpts")
def cmd_get_cmd_line_opts(
    ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None
) -> Reply:
    return {
        "argv": ctx.argv,
        "parsed": {
            "net": {"bindIp": ctx.host, "port": ctx.port},
            "replication": {"replSetName": SET_NAME},
            "setParameter": {"enableTestCommands": "1"},
        },
    }


@command("serverStatus")
def cmd_server_status(
    ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None
) -> Reply:
    return {
        "host": ctx.host_port,
        "version": VERSION,
        "process": "mongo_double",
        "pid": Int64(os.getpid()),
        "uptime": float(time.time() - ctx.started),
        "localTime": datetime.datetime.now(datetime.UTC),
        "connections": {"current": ctx.connections},
        "storageEngine": {"name": "mongo_double"},
    }


@command("replSetGetStatus")
def cmd_repl_status(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    return {
        "set": SET_NAME,
        "myState": 1,
        "members": [
            {"_id": 0, "name": ctx.host_port, "health": 1.0, "state": 1, "stateStr": "PRIMARY", "self": True}
        ],
    }


@command("connectionStatus")
def cmd_connection_status(
    ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None
) -> Reply:
    return {"authInfo": {"authenticatedUsers": [], "authenticatedUserRoles": []}}


# This server has no users, so every authentication attempt fails the way mongod answers one for a user
# it does not know: AuthenticationFailed (18), "Authentication failed." (mongod never says which part
# was wrong). Whatever the mechanism (SCRAM's saslStart, X.509's authenticate), at its first step.
@command("saslStart", "saslContinue", "authenticate")
def cmd_authenticate(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    raise MongoError(18, "Authentication failed.")


@command("whatsmyuri")
def cmd_whatsmyuri(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    return {"you": conn.peer}


@command("endSessions", "killAllSessions", "killSessions", "refreshSessions")
def cmd_end_sessions(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    name = next(iter(cmd))
    if name in ("endSessions", "killSessions") and isinstance(cmd[name], list):
        ctx.txns.end_sessions([s for s in cmd[name] if isinstance(s, dict)])
    return {}


@command("configureFailPoint")
def cmd_configure_fail_point(
    ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None
) -> Reply:
    if db != "admin":
        raise MongoError(13, "configureFailPoint may only be run against the admin database.")
    return ctx.failpoints.configure(cmd)


# ---------------------------------------------------------------------------------------------
# Transactions


@command("commitTransaction")
def cmd_commit(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    if txn is None:
        raise MongoError(50768, "commitTransaction must be run within a transaction")
    ctx.txns.commit(txn)
    return {}


@command("abortTransaction")
def cmd_abort(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    if txn is None:
        raise MongoError(50768, "abortTransaction must be run within a transaction")
    if txn.state == "committed":
        raise MongoError(256, "Cannot abort a committed transaction")
    if txn.state == "aborted":
        raise MongoError(251, "Transaction has been aborted.", labels=["TransientTransactionError"])
    ctx.txns.abort(txn)
    return {}


# ---------------------------------------------------------------------------------------------
# CRUD


@command("insert")
def cmd_insert(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    coll = _coll_name(cmd, "insert")
    docs = list(_doc_list(cmd, "documents"))
    for i, doc in enumerate(docs):
        if isinstance(doc, dict) and "_id" not in doc:
            docs[i] = {"_id": ObjectId(), **doc}  # fixed here so a transaction's replay keeps the same _id
    refused = _refused_view_write(ctx, txn, db, coll, len(docs), cmd.get("ordered", True), "insert")
    if refused is not None:
        return refused
    return _counted_write(ctx, txn, "insert", storage.insert, db, coll, docs, cmd.get("ordered", True))


def _counted_write(
    ctx: Context,
    txn: Transaction | None,
    kind: str,
    write: Callable[..., tuple[int, list[dict[str, Any]], list[ChangeRecord]]],
    db: str,
    coll: str,
    statements: list[Any],
    ordered: bool,
) -> Reply:
    """An insert or delete: reply {n, writeErrors}; inside a transaction, recorded for the commit."""

    def run(view: storage.View) -> tuple[dict, list[ChangeRecord]]:
        n, errors, records = write(view, db, coll, statements, ordered)
        reply: dict[str, Any] = {"n": n}
        if errors:
            reply["writeErrors"] = errors
        return reply, records

    reply = _run_write(ctx, txn, run)
    if txn is not None:
        if "writeErrors" in reply:
            raise _first_write_error(reply)
        txn.ops.append((kind, db, coll, statements))
    return reply


def _refused_view_write(
    ctx: Context, txn: Transaction | None, db: str, coll: str, statements: int, ordered: bool, kind: str
) -> Reply | None:
    """The reply of a write to a view (166 per statement tried), None if `coll` is not a view."""
    with ctx.store.lock:
        if not views.is_view(ctx.store, db, coll):
            return None
    reply = views.refused_writes(db, coll, statements, ordered, kind)
    if txn is not None:
        raise _first_write_error(reply)
    return reply


def _first_write_error(reply: dict[str, Any]) -> MongoError:
    """In a transaction a write error aborts it; mongod reports it as the command's error."""
    err = reply["writeErrors"][0]
    extra = {k: v for k, v in err.items() if k in ("keyPattern", "keyValue")}
    # A write conflict inside a transaction is transient, as on mongod: the driver retries it.
    labels = ["TransientTransactionError"] if err["code"] == 112 else None
    return MongoError(err["code"], err["errmsg"], labels=labels, extra=extra)


@command("update")
def cmd_update(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    coll = _coll_name(cmd, "update")
    statements = [dict(s) for s in _doc_list(cmd, "updates")]
    ordered = cmd.get("ordered", True)
    refused = _refused_view_write(ctx, txn, db, coll, len(statements), ordered, "update")
    if refused is not None:
        return refused
    reply = _run_write(ctx, txn, lambda view: storage.update(view, db, coll, statements, ordered))
    if txn is not None:
        if "writeErrors" in reply:
            raise _first_write_error(reply)
        for up in reply.get("upserted", []):
            statements[up["index"]] = _pin_upsert(statements[up["index"]], "u", "q", up["_id"])
        txn.ops.append(("update", db, coll, statements))
    return reply


def _pin_upsert(stmt: dict[str, Any], update_key: str, query_key: str, new_id: Any) -> dict[str, Any]:
    """Make a replayed upsert insert the _id the client was already told about."""
    stmt = dict(stmt)
    if "_id" in (stmt.get(query_key) or {}):
        return stmt
    if isinstance(stmt.get(update_key), list):  # a pipeline: a last stage sets the _id
        stmt[update_key] = [*stmt[update_key], {"$set": {"_id": {"$literal": new_id}}}]
        return stmt
    update_doc = dict(stmt.get(update_key) or {})
    if any(k.startswith("$") for k in update_doc):
        update_doc["$setOnInsert"] = {**update_doc.get("$setOnInsert", {}), "_id": new_id}
    else:
        update_doc["_id"] = new_id
    stmt[update_key] = update_doc
    return stmt


@command("delete")
def cmd_delete(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    coll = _coll_name(cmd, "delete")
    statements = list(_doc_list(cmd, "deletes"))
    refused = _refused_view_write(ctx, txn, db, coll, len(statements), cmd.get("ordered", True), "delete")
    if refused is not None:
        return refused
    return _counted_write(ctx, txn, "delete", storage.delete, db, coll, statements, cmd.get("ordered", True))


@command("findAndModify", "findandmodify")
def cmd_find_and_modify(
    ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None
) -> Reply:
    coll = _coll_name(cmd, next(iter(cmd)))
    ns = f"{db}.{coll}"
    _refuse_view(ctx, db, coll)

    def run(view: storage.View) -> tuple[dict, list[ChangeRecord]]:
        try:
            return storage.find_and_modify(view, db, coll, cmd)
        except Exception as exc:
            raise storage.map_exception(exc, ns) from exc

    reply = _run_write(ctx, txn, run)
    if txn is not None:
        args = dict(cmd)
        upserted = reply["lastErrorObject"].get("upserted")
        if upserted is not None:
            args = _pin_upsert(args, "update", "query", upserted)
        txn.ops.append(("findAndModify", db, coll, args))
    return reply


def _refuse_view(ctx: Context, db: str, coll: str) -> None:
    """166 for a command that needs a collection (writes, indexes, change streams)."""
    with ctx.store.lock:
        if views.is_view(ctx.store, db, coll):
            raise views.not_a_collection(db, coll)


def _resolved_view(ctx: Context, db: str, coll: str) -> tuple[str, list[dict[str, Any]]] | None:
    with ctx.store.lock:
        return views.resolve(ctx.store, db, coll)


def _read_view(
    ctx: Context,
    txn: Transaction | None,
    db: str,
    coll: str,
    resolved: tuple[str, list[dict[str, Any]]],
    stages: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """A read on a view: the view's pipeline over its source collection, then the command's stages."""
    source, pipeline = resolved
    pipeline = pipeline + changestreams.translate_stages(stages)
    return _read(ctx, txn, lambda view: list(view.collection(db, source).aggregate(pipeline)), f"{db}.{coll}")


def _read(ctx: Context, txn: Transaction | None, fn: Callable[[storage.View], Any], ns: str) -> Any:
    try:
        if txn is not None:
            return fn(txn.view)
        with ctx.store.lock:
            return fn(ctx.store)
    except MongoError:
        raise
    except Exception as exc:
        raise storage.map_exception(exc, ns) from exc


@command("find")
def cmd_find(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    coll = _coll_name(cmd, "find")
    for option in ("let", "max", "min", "returnKey", "showRecordId", "tailable", "awaitData"):
        if cmd.get(option):
            raise MongoError(115, f"find option '{option}' is not supported by the MongoDB test server")
    ns = f"{db}.{coll}"
    resolved = None if oplog.is_oplog(db, coll) else _resolved_view(ctx, db, coll)
    if oplog.is_oplog(db, coll):
        docs = oplog.find(ctx.log, cmd)
    elif resolved is not None:
        docs = _read_view(ctx, txn, db, coll, resolved, views.find_stages(cmd))
    else:
        docs = _read(ctx, txn, lambda view: list(storage.iter_find(view.collection(db, coll), cmd)), ns)
    single = bool(cmd.get("singleBatch")) or (isinstance(cmd.get("limit"), int) and cmd["limit"] < 0)
    return reply_cursor(ctx, ns, docs, cmd.get("batchSize"), single)


@command("getMore")
def cmd_get_more(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    cursor_id = cmd["getMore"]
    if not isinstance(cursor_id, int) or isinstance(cursor_id, bool):
        raise MongoError(14, "BSON field 'getMore.getMore' is the wrong type, expected type 'long'")
    cursor = ctx.cursors.get(cursor_id)
    if cursor is None:
        raise MongoError(43, f"cursor id {cursor_id} not found")
    batch_size = cmd.get("batchSize")
    if isinstance(cursor, ResultCursor):
        batch = cursor.take(batch_size)
        if cursor.exhausted:
            ctx.cursors.remove(cursor_id)
        return {
            "cursor": {"nextBatch": batch, "id": Int64(0 if cursor.exhausted else cursor_id), "ns": cursor.ns}
        }
    return _change_stream_get_more(ctx, conn, cmd, cursor, batch_size)


def _change_stream_get_more(
    ctx: Context, conn: Connection, cmd: Command, stream: ChangeStream, batch_size: int | None
) -> Reply:
    data = ctx.failpoints.check(
        "failGetMoreAfterCursorCheckout", "getMore", conn.app_name, stream.db, stream.coll
    )
    if data is not None:
        code = int(data.get("errorCode", 1))
        labels = data.get("errorLabels")
        if labels is None:
            labels = ["ResumableChangeStreamError"] if code in RESUMABLE_CHANGE_STREAM_CODES else []
        raise MongoError(
            code, "Failing command via 'failGetMoreAfterCursorCheckout' failpoint", labels=labels
        )
    if not stream.lock.acquire(blocking=False):
        raise MongoError(292, f"cursor id {stream.cursor_id} is already in use")
    try:
        await_ms = cmd.get("maxTimeMS", changestreams.DEFAULT_AWAIT_MS)
        batch, pbrt = changestreams.next_batch(ctx.log, stream, batch_size, await_ms, _lookup(ctx))
    except MongoError as err:
        if err.code in RESUMABLE_CHANGE_STREAM_CODES and "ResumableChangeStreamError" not in err.labels:
            err.labels.append("ResumableChangeStreamError")
        if err.code == BSON_OBJECT_TOO_LARGE:
            # mongod's executor failed on the event: the cursor is gone, the error carries its context.
            ctx.cursors.remove(stream.cursor_id)
            err.errmsg = f"Executor error during getMore :: caused by :: {err.errmsg}"
        raise
    finally:
        stream.lock.release()
    cursor_id = stream.cursor_id
    if stream.invalidated:
        ctx.cursors.remove(cursor_id)
        cursor_id = 0
    return {
        "cursor": {"nextBatch": batch, "postBatchResumeToken": pbrt, "id": Int64(cursor_id), "ns": stream.ns}
    }


def _lookup(ctx: Context) -> changestreams.Lookup:
    def lookup(db: str, coll: str, key: dict[str, Any]) -> dict[str, Any] | None:
        with ctx.store.lock:
            c = ctx.store.collection(db, coll)
            return storage.by_id(c, key["_id"]) if list(key) == ["_id"] else c.find_one(key)

    return lookup


@command("killCursors")
def cmd_kill_cursors(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    killed, missing = [], []
    for cursor_id in cmd.get("cursors") or []:
        (killed if ctx.cursors.remove(int(cursor_id)) else missing).append(Int64(cursor_id))
    return {"cursorsKilled": killed, "cursorsNotFound": missing, "cursorsAlive": [], "cursorsUnknown": []}


@command("count")
def cmd_count(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    coll = _coll_name(cmd, "count")
    find_cmd = {"filter": cmd.get("query") or {}, "skip": cmd.get("skip"), "limit": cmd.get("limit")}
    resolved = _resolved_view(ctx, db, coll)
    if resolved is not None:
        return {"n": len(_read_view(ctx, txn, db, coll, resolved, views.find_stages(find_cmd)))}
    docs = _read(
        ctx, txn, lambda view: list(storage.iter_find(view.collection(db, coll), find_cmd)), f"{db}.{coll}"
    )
    return {"n": len(docs)}


@command("distinct")
def cmd_distinct(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    coll = _coll_name(cmd, "distinct")
    key = cmd.get("key")
    if not isinstance(key, str):
        raise MongoError(14, "distinct key must be a string")
    resolved = _resolved_view(ctx, db, coll)
    if resolved is not None:
        docs = _read_view(ctx, txn, db, coll, resolved, views.find_stages({"filter": cmd.get("query")}))
        return {"values": views.distinct_values(docs, key)}
    # Not mongomock's distinct: it cannot hash a Decimal128 and keeps 10 and Decimal128("10") apart.
    docs = _read(
        ctx, txn, lambda view: list(view.collection(db, coll).find(cmd.get("query") or {})), f"{db}.{coll}"
    )
    return {"values": views.distinct_values(docs, key)}


@command("aggregate")
def cmd_aggregate(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    target = cmd["aggregate"]
    pipeline = cmd.get("pipeline")
    if not isinstance(pipeline, list):
        raise MongoError(14, "'pipeline' option must be specified as an array")
    if cmd.get("explain"):
        raise MongoError(115, "explain is not supported by the MongoDB test server")
    cursor_opts = cmd.get("cursor") or {}
    batch_size = cursor_opts.get("batchSize")
    coll = target if isinstance(target, str) else None
    if pipeline and isinstance(pipeline[0], dict) and "$changeStream" in pipeline[0]:
        if txn is not None:
            raise MongoError(263, "Cannot run a $changeStream in a multi-document transaction.")
        if coll is not None:
            _refuse_view(ctx, db, coll)
        stream = changestreams.open_stream(
            ctx.log, ctx.cursors.new_id(), db, coll, pipeline[0]["$changeStream"], pipeline[1:]
        )
        try:
            batch, pbrt = changestreams.next_batch(ctx.log, stream, batch_size, 0, _lookup(ctx))
        except MongoError as err:
            if err.code == BSON_OBJECT_TOO_LARGE:
                err.errmsg = f"PlanExecutor error during aggregation :: caused by :: {err.errmsg}"
            raise
        cursor_id = 0 if stream.invalidated else stream.cursor_id
        if cursor_id:
            ctx.cursors.add(stream)
        return {
            "cursor": {
                "firstBatch": batch,
                "postBatchResumeToken": pbrt,
                "id": Int64(cursor_id),
                "ns": stream.ns,
            }
        }
    for stage in pipeline:
        name = next(iter(stage)) if isinstance(stage, dict) and stage else None
        if name == "$changeStream":
            raise MongoError(40602, "$changeStream is only valid as the first stage in a pipeline.")
        if name == changestreams.SPLIT_STAGE:
            raise MongoError(20, f"{name} can only be used in a $changeStream pipeline")
        if name not in mongomock.aggregate._PIPELINE_HANDLERS and name not in ("$replaceWith", "$unset"):
            raise MongoError(40324, f"Unrecognized pipeline stage name: '{name}'")
    if coll is None:
        raise MongoError(
            115,
            f"database-level aggregate ({pipeline[0] if pipeline else {}}) is not supported by "
            "the MongoDB test server",
        )
    ns = f"{db}.{coll}"
    resolved = _resolved_view(ctx, db, coll)
    if resolved is not None:
        return reply_cursor(ctx, ns, _read_view(ctx, txn, db, coll, resolved, pipeline), batch_size)
    stages = changestreams.translate_stages(pipeline)

    def run(view: storage.View) -> list[dict[str, Any]]:
        return list(view.collection(db, coll).aggregate(stages))

    docs = _read(ctx, txn, run, ns)
    return reply_cursor(ctx, ns, docs, batch_size)


# ---------------------------------------------------------------------------------------------
# Collections, databases and indexes


@command("create")
def cmd_create(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    coll = _coll_name(cmd, "create")
    if "pipeline" in cmd and "viewOn" not in cmd:
        raise MongoError(72, "'pipeline' requires 'viewOn' to also be specified")
    if "viewOn" in cmd:
        if txn is not None:
            raise MongoError(263, "Cannot create a view in a multi-document transaction.")
        with ctx.store.lock:
            views.create(ctx.store, ctx.log, db, coll, cmd, ENVELOPE)
        return {}
    unsupported = set(cmd) - {"create", "changeStreamPreAndPostImages", *ENVELOPE}
    if unsupported:
        raise MongoError(
            115, f"create option(s) {sorted(unsupported)} not supported by the MongoDB test server"
        )
    images = bool((cmd.get("changeStreamPreAndPostImages") or {}).get("enabled"))
    view = _view(ctx, txn)
    with ctx.store.lock:
        if views.is_view(ctx.store, db, coll):
            raise MongoError(48, f"A view already exists. NS: {db}.{coll}")
        if view.exists(db, coll):
            raise MongoError(48, f"Collection {db}.{coll} already exists.")
        if txn is not None:
            txn.view.collection(db, coll)
            txn.view.shadow[db].create_collection(coll)
            txn.ops.append(("create", db, coll, None))
            return {}
        ctx.store.client[db].create_collection(coll)
        meta = ctx.store.coll_meta(db, coll)
        meta.images = images
        options = {"changeStreamPreAndPostImages": {"enabled": True}} if images else {}
        ctx.log.append([expanded_events.create_record(db, coll, meta.uuid, options)])
    return {}


@command("drop")
def cmd_drop(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    coll = _coll_name(cmd, "drop")
    with ctx.store.lock:
        if views.is_view(ctx.store, db, coll):
            views.drop(ctx.store, ctx.log, db, coll)
            return {"ns": f"{db}.{coll}"}  # no nIndexesWas: a view has no indexes
        if not ctx.store.exists(db, coll):
            return {}  # MongoDB 7.0 answers ok for a collection that does not exist
        n_indexes = len(ctx.store.collection(db, coll).index_information())
        uuid = ctx.store.coll_meta(db, coll).uuid
        ctx.store.collection(db, coll).drop()
        ctx.store.forget(db, coll)
        ctx.log.append([ChangeRecord("drop", db, coll, uuid=uuid)])
    return {"ns": f"{db}.{coll}", "nIndexesWas": n_indexes}


@command("dropDatabase")
def cmd_drop_database(
    ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None
) -> Reply:
    with ctx.store.lock:
        names = ctx.store.collection_names(db)
        had_views = views.has_system_views(ctx.store, db)
        records = [ChangeRecord("drop", db, name, uuid=ctx.store.coll_meta(db, name).uuid) for name in names]
        for name in names:
            ctx.store.forget(db, name)
        ctx.store.client.drop_database(db)
        if records or had_views:
            records.append(ChangeRecord("dropDatabase", db, None))
        ctx.log.append(records)
    return {"dropped": db}


@command("renameCollection")
def cmd_rename(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    if db != "admin":
        raise MongoError(13, "renameCollection may only be run against the admin database.")
    source, target = cmd.get("renameCollection"), cmd.get("to")
    if not (isinstance(source, str) and isinstance(target, str) and "." in source and "." in target):
        raise MongoError(73, "Invalid source or target namespace")
    src_db, src_coll = source.split(".", 1)
    dst_db, dst_coll = target.split(".", 1)
    store = ctx.store
    with store.lock:
        if views.is_view(store, src_db, src_coll):
            raise MongoError(166, f"cannot rename view: {source}")
        if views.is_view(store, dst_db, dst_coll):
            raise MongoError(48, f"a view already exists with that name: {target}")
        if not store.exists(src_db, src_coll):
            raise MongoError(26, f"Source collection {source} does not exist")
        description: dict[str, Any] = {"to": {"db": dst_db, "coll": dst_coll}}
        if store.exists(dst_db, dst_coll):
            if not cmd.get("dropTarget"):
                raise MongoError(48, f"target namespace {target} exists")
            description["dropTarget"] = Binary.from_uuid(store.coll_meta(dst_db, dst_coll).uuid)
            store.collection(dst_db, dst_coll).drop()
            store.forget(dst_db, dst_coll)
        meta = store.coll_meta(src_db, src_coll)
        store.meta.pop((src_db, src_coll), None)
        if src_db == dst_db:
            store.client[src_db].rename_collection(src_coll, dst_coll)
        else:
            storage.copy_collection(store.collection(src_db, src_coll), store.collection(dst_db, dst_coll))
            store.collection(src_db, src_coll).drop()
        if meta is not None:
            store.meta[(dst_db, dst_coll)] = meta
        ctx.log.append(
            [
                ChangeRecord(
                    "rename", src_db, src_coll, to={"db": dst_db, "coll": dst_coll}, uuid=meta.uuid,
                    description=description,
                )
            ]
        )  # fmt: skip
    return {}


@command("collMod")
def cmd_coll_mod(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    coll = _coll_name(cmd, "collMod")
    with ctx.store.lock:
        if views.is_view(ctx.store, db, coll):
            views.coll_mod(ctx.store, ctx.log, db, coll, cmd, ENVELOPE)
            return {}
    for option in ("pipeline", "viewOn"):
        if option in cmd:
            raise MongoError(72, f"option only supported on a view: {option}")
    unsupported = set(cmd) - {"collMod", "changeStreamPreAndPostImages", *ENVELOPE}
    if unsupported:
        raise MongoError(
            72, f"collMod option(s) {sorted(unsupported)} not supported by the MongoDB test server"
        )
    with ctx.store.lock:
        if not ctx.store.exists(db, coll):
            raise MongoError(26, f"ns does not exist: {db}.{coll}")
        images_before = ctx.store.images_enabled(db, coll)
        if "changeStreamPreAndPostImages" in cmd:
            spec = cmd["changeStreamPreAndPostImages"]
            if not isinstance(spec, dict) or not isinstance(spec.get("enabled"), bool):
                raise MongoError(
                    40414, "BSON field 'changeStreamPreAndPostImages.enabled' is missing but a required field"
                )
            ctx.store.coll_meta(db, coll).images = spec["enabled"]
        meta = ctx.store.coll_meta(db, coll)
        before = {"uuid": Binary.from_uuid(meta.uuid)}
        if images_before:
            before["changeStreamPreAndPostImages"] = {"enabled": True}
        description = {k: v for k, v in cmd.items() if k not in ("collMod", *ENVELOPE)}
        ctx.log.append(
            [
                ChangeRecord(
                    "modify", db, coll, uuid=meta.uuid, description=description,
                    state_before={"collectionOptions": before},
                )
            ]
        )  # fmt: skip
    return {}


@command("listCollections")
def cmd_list_collections(
    ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None
) -> Reply:
    docs = []
    with ctx.store.lock:
        for name in sorted(ctx.store.collection_names(db)):
            meta = ctx.store.coll_meta(db, name)
            options = {"changeStreamPreAndPostImages": {"enabled": True}} if meta.images else {}
            if cmd.get("nameOnly"):
                doc: dict[str, Any] = {"name": name, "type": "collection"}
            else:
                doc = {
                    "name": name,
                    "type": "collection",
                    "options": options,
                    "info": {"readOnly": False, "uuid": Binary.from_uuid(meta.uuid)},
                    "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"},
                }
            if filter_applies(cmd.get("filter") or {}, doc):
                docs.append(doc)
        docs.extend(_list_views(ctx, db, cmd))
    batch_size = (cmd.get("cursor") or {}).get("batchSize")
    return reply_cursor(ctx, f"{db}.$cmd.listCollections", docs, batch_size)


def _list_views(ctx: Context, db: str, cmd: Command) -> list[dict[str, Any]]:
    """listCollections documents of the views and of system.views (mongod creates it with the first view)."""
    docs = views.all_views(ctx.store, db)
    if cmd.get("nameOnly"):
        docs = [{"name": d["name"], "type": "view"} for d in docs]
    if views.has_system_views(ctx.store, db):
        uuid = ctx.store.coll_meta(db, views.SYSTEM_VIEWS).uuid
        system: dict[str, Any] = {"name": views.SYSTEM_VIEWS, "type": "collection"}
        if not cmd.get("nameOnly"):
            system.update(
                options={},
                info={"readOnly": False, "uuid": Binary.from_uuid(uuid)},
                idIndex=dict(expanded_events.ID_INDEX),
            )
        docs.append(system)
    return [d for d in docs if filter_applies(cmd.get("filter") or {}, d)]


@command("listDatabases")
def cmd_list_databases(
    ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None
) -> Reply:
    with ctx.store.lock:
        names = sorted(ctx.store.database_names())
    docs = [{"name": n, "sizeOnDisk": Int64(0), "empty": False} for n in names]
    docs = [d for d in docs if filter_applies(cmd.get("filter") or {}, d)]
    if cmd.get("nameOnly"):
        return {"databases": [{"name": d["name"]} for d in docs]}
    return {"databases": docs, "totalSize": Int64(0), "totalSizeMb": Int64(0)}


@command("createIndexes")
def cmd_create_indexes(
    ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None
) -> Reply:
    coll = _coll_name(cmd, "createIndexes")
    specs = cmd.get("indexes")
    _refuse_view(ctx, db, coll)
    if not isinstance(specs, list) or not specs:
        raise MongoError(2, "Must specify at least one index to create")
    view = _view(ctx, txn)
    with ctx.store.lock:
        created = not view.exists(db, coll)
        c = view.collection(db, coll)
        if created:
            c.database.create_collection(coll)
        before = len(c.index_information())
        before_names = set(c.index_information())
        empty = c.estimated_document_count() == 0
        for spec in specs:
            key = spec.get("key")
            if not isinstance(key, dict) or not key:
                raise MongoError(67, "index key pattern must be a non-empty object")
            options = {
                k: v
                for k, v in spec.items()
                if k in ("unique", "sparse", "partialFilterExpression", "expireAfterSeconds")
            }
            unknown = set(spec) - {"key", "name", "v", "background", *options}
            if unknown:
                raise MongoError(
                    115, f"index option(s) {sorted(unknown)} not supported by the MongoDB test server"
                )
            try:
                c.create_index(list(key.items()), name=spec.get("name"), **options)
            except Exception as exc:
                raise storage.map_exception(exc, f"{db}.{coll}") from exc
        after = len(c.index_information())
        if txn is None:
            _log_created_indexes(ctx, db, coll, c, before_names, empty)
    reply: dict[str, Any] = {
        "createdCollectionAutomatically": created,
        "numIndexesBefore": before,
        "numIndexesAfter": after,
    }
    if before == after:
        reply["note"] = "all indexes already exist"
    return reply


def _log_created_indexes(
    ctx: Context, db: str, coll: str, c: mongomock.Collection, before: set[str], empty: bool
) -> None:
    """createIndexes events: mongod logs an index on an empty collection at once (one event each),
    one built over existing documents when its build commits (one event for the command's indexes)."""
    new = [expanded_events.index_spec(n, i) for n, i in c.index_information().items() if n not in before]
    if not new:
        return
    groups = [[spec] for spec in new] if empty else [new]
    ctx.log.append([ChangeRecord("createIndexes", db, coll, description={"indexes": g}) for g in groups])


def _index_docs(c: mongomock.Collection) -> list[dict[str, Any]]:
    docs = []
    for name, info in c.index_information().items():
        doc: dict[str, Any] = {"v": 2, "key": dict(info["key"]), "name": name}
        for option in ("unique", "sparse", "partialFilterExpression", "expireAfterSeconds"):
            if info.get(option) is not None and (option != "unique" or name != "_id_"):
                doc[option] = info[option]
        docs.append(doc)
    return docs


@command("listIndexes")
def cmd_list_indexes(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    coll = _coll_name(cmd, "listIndexes")
    _refuse_view(ctx, db, coll)
    view = _view(ctx, txn)
    with ctx.store.lock:
        if not view.exists(db, coll):
            raise MongoError(26, f"ns does not exist: {db}.{coll}")
        docs = _index_docs(view.collection(db, coll))
    return reply_cursor(ctx, f"{db}.{coll}", docs, (cmd.get("cursor") or {}).get("batchSize"))


@command("dropIndexes", "deleteIndexes")
def cmd_drop_indexes(ctx: Context, conn: Connection, cmd: Command, db: str, txn: Transaction | None) -> Reply:
    name = next(iter(cmd))
    coll = _coll_name(cmd, name)
    index = cmd.get("index")
    _refuse_view(ctx, db, coll)
    with ctx.store.lock:
        if not ctx.store.exists(db, coll):
            raise MongoError(26, f"ns not found {db}.{coll}")
        c = ctx.store.collection(db, coll)
        info = c.index_information()
        if index == "*":
            c.drop_indexes()
            _log_dropped_indexes(ctx, db, coll, info, [n for n in info if n != "_id_"])
            return {"nIndexesWas": len(info)}
        names = index if isinstance(index, list) else [index]
        resolved = []
        for item in names:
            if isinstance(item, dict):
                match = [n for n, i in info.items() if dict(i["key"]) == item]
                if not match:
                    raise MongoError(27, f"can't find index with key: {item}")
                item = match[0]
            if item == "_id_":
                raise MongoError(72, "cannot drop _id index")
            if item not in info:
                raise MongoError(27, f"index not found with name [{item}]")
            resolved.append(item)
        for item in resolved:
            c.drop_index(item)
        _log_dropped_indexes(ctx, db, coll, info, resolved)
    return {"nIndexesWas": len(info)}


def _log_dropped_indexes(ctx: Context, db: str, coll: str, info: dict[str, Any], names: list[str]) -> None:
    """One dropIndexes event per dropped index, its spec as operationDescription.indexes[0]."""
    specs = [expanded_events.index_spec(name, info[name]) for name in names]
    ctx.log.append([ChangeRecord("dropIndexes", db, coll, description={"indexes": [s]}) for s in specs])
