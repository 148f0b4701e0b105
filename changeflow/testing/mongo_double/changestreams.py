"""The change-event log, resume tokens and change-stream cursors (MongoDB 7.0 semantics).

Every write appends ChangeRecords to the log under the storage lock; the log stamps them with a
cluster time and a sequence number. A change stream is a position (the sequence number of the last
event it has passed) plus a filter. Waiting readers block on the log's Condition only, never on the
storage lock, so writers are never held up by an idle listener.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import bson
from bson import Binary, Int64, Timestamp
from bson.raw_bson import RawBSONDocument
from mongomock.aggregate import process_pipeline

from changeflow.testing.mongo_double import expanded_events
from changeflow.testing.mongo_double.errors import (
    BSON_MAX_INTERNAL_SIZE,
    BSON_MAX_USER_SIZE,
    MongoError,
    bson_object_too_large,
)
from changeflow.testing.mongo_double.match import compile_match
from changeflow.testing.mongo_double.storage import ChangeRecord

# Stages mongod allows after $changeStream.
ALLOWED_STAGES = frozenset(
    {"$match", "$project", "$addFields", "$set", "$unset", "$replaceRoot", "$replaceWith", "$redact"}
)
SPLIT_STAGE = "$changeStreamSplitLargeEvent"
# Every stage name mongod 7.0 parses: a name outside this set is unrecognized (40324), a name in it
# but not in ALLOWED_STAGES is refused in a change stream (20, after the whole pipeline parsed).
KNOWN_STAGES = ALLOWED_STAGES | {
    SPLIT_STAGE, "$changeStream", "$bucket", "$bucketAuto", "$collStats", "$count", "$currentOp",
    "$densify", "$documents", "$facet", "$fill", "$geoNear", "$graphLookup", "$group", "$indexStats",
    "$limit", "$listLocalSessions", "$listSampledQueries", "$listSearchIndexes", "$listSessions",
    "$lookup", "$merge", "$out", "$planCacheStats", "$sample", "$search", "$searchMeta",
    "$setWindowFields", "$shardedDataDistribution", "$skip", "$sort", "$sortByCount", "$unionWith",
    "$unwind", "$vectorSearch",
}  # fmt: skip
# Events larger than this are split by SPLIT_STAGE (mongod: DocumentSourceChangeStreamSplitLargeEvent::
# kBSONObjMaxChangeEventSize); without the stage, an event over BSON_MAX_INTERNAL_SIZE fails the
# command with BSONObjectTooLarge (10334), as mongod's serialization of the event does.
MAX_CHANGE_EVENT_SIZE = BSON_MAX_INTERNAL_SIZE - 8 * 1024
INTERNAL_DBS = frozenset({"admin", "config", "local"})
NO_USER_UID = Binary(hashlib.sha256(b"").digest())
DEFAULT_AWAIT_MS = 1000  # mongod's awaitData default when getMore carries no maxTimeMS


class Clock:
    """Cluster time: a Timestamp that strictly increases with every write."""

    def __init__(self) -> None:
        self._last = Timestamp(int(time.time()), 1)

    def now(self) -> Timestamp:
        return self._last

    def tick(self) -> Timestamp:
        seconds = int(time.time())
        last = self._last
        self._last = Timestamp(seconds, 1) if seconds > last.time else Timestamp(last.time, last.inc + 1)
        return self._last


# ---------------------------------------------------------------------------------------------
# Resume tokens: _data = hex(seconds:8, increment:8, sequence:16, flag:2), so that string order
# equals event order. flag 1 marks the invalidate event that follows the event with that sequence.
# A fragment of a split event appends its 0-based fragment number (8 hex digits), as mongod's token
# carries `fragmentNum`: the fragments sort after the event's own position and before the next event.


@dataclass(frozen=True, order=True)
class Position:
    ts_seconds: int
    ts_inc: int
    seq: int
    invalidate: bool = False
    fragment: int = -1  # -1: not a fragment

    def token(self) -> dict[str, str]:
        data = f"{self.ts_seconds:08X}{self.ts_inc:08X}{self.seq:016X}{int(self.invalidate):02X}"
        return {"_data": data + (f"{self.fragment:08X}" if self.fragment >= 0 else "")}


def decode_token(token: Any) -> Position:
    data = token.get("_data") if isinstance(token, dict) else None
    if not isinstance(data, str) or len(data) not in (34, 42):
        raise MongoError(260, f"Invalid resume token: {token!r}")
    try:
        fragment = int(data[34:42], 16) if len(data) == 42 else -1
        return Position(
            int(data[0:8], 16), int(data[8:16], 16), int(data[16:32], 16), data[32:34] == "01", fragment
        )
    except ValueError:
        raise MongoError(260, f"Invalid resume token: {token!r}") from None


@dataclass
class Event:
    seq: int
    ts: Timestamp
    wall: datetime.datetime
    record: ChangeRecord
    lsid: dict[str, Any] | None = None
    txn_number: Int64 | None = None

    def position(self, invalidate: bool = False) -> Position:
        return Position(self.ts.time, self.ts.inc, self.seq, invalidate)


class EventLog:
    """The bounded in-memory oplog of change events."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.cond = threading.Condition()
        self.clock = Clock()
        self.events: deque[Event] = deque()
        self.last_seq = 0
        # The newest event dropped from the log: resuming before it would lose events.
        self.trimmed_seq = 0
        self.trimmed_ts: Timestamp | None = None
        self.closed = False
        # The replica set's first oplog entry (mongod's "initiating set" no-op): the oldest until trimmed.
        self.started_ts = self.clock.now()
        self.started_wall = datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0)
        # Completes records before they are stamped (expanded_events.prepare, set by the server).
        self.prepare: Callable[[list[ChangeRecord]], list[ChangeRecord]] | None = None

    def append(self, records: list[ChangeRecord], lsid: dict | None = None, txn_number: Any = None) -> None:
        """Stamp and store records; the caller holds the storage lock, so log order == write order."""
        if self.prepare is not None:
            records = self.prepare(records)
        if not records:
            return
        with self.cond:
            # Events of one transaction share the commit's cluster time, as in mongod's applyOps.
            shared = self.clock.tick() if lsid is not None else None
            for record in records:
                ts = shared or self.clock.tick()
                self.last_seq += 1
                wall = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
                wall = wall.replace(microsecond=wall.microsecond // 1000 * 1000)
                txn = Int64(txn_number) if txn_number is not None else None
                self.events.append(Event(self.last_seq, ts, wall, record, lsid, txn))
                if len(self.events) > self.size:
                    dropped = self.events.popleft()
                    self.trimmed_seq, self.trimmed_ts = dropped.seq, dropped.ts
            self.cond.notify_all()

    def tick(self) -> Timestamp:
        with self.cond:
            return self.clock.tick()

    def now(self) -> Timestamp:
        with self.cond:
            return self.clock.now()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # Called with self.cond held.
    def _after(self, seq: int, max_events: int = 1000) -> list[Event]:
        """Up to max_events events after `seq`, oldest first (read from the right: readers are usually near
        the end, and deque indexing from the left is O(n))."""
        behind = min(self.last_seq - seq, len(self.events))
        if behind <= 0:
            return []
        newest_first = list(itertools.islice(reversed(self.events), behind))
        return newest_first[::-1][:max_events]

    def _position_of(self, seq: int) -> Position:
        """High-water mark just after event `seq`: sorts after it and before the next event."""
        if seq >= self.last_seq:
            now = self.clock.now()
            return Position(now.time, now.inc, seq)
        if self.events and self.events[0].seq <= seq:
            return self.events[seq - self.events[0].seq].position()
        nxt = self.events[0].ts if self.events else self.clock.now()
        return Position(nxt.time, max(0, nxt.inc - 1), seq)


@dataclass
class ChangeStream:
    """A change-stream cursor."""

    cursor_id: int
    db: str
    coll: str | None  # None: a database or cluster stream
    cluster: bool
    pipeline: list[dict[str, Any]]
    full_document: str
    before_change: str
    seq: int  # last event passed (returned, stashed or filtered out)
    min_ts: Timestamp | None = None
    invalidated: bool = False
    split: bool = False  # the pipeline ends with $changeStreamSplitLargeEvent
    # Resuming from a fragment token: (event sequence, fragment number) whose later fragments come first.
    resume_fragment: tuple[int, int] | None = None
    # Documents produced but not returned yet: a batch is full (count or bytes) in mid-event.
    stash: deque[Outgoing] = field(default_factory=deque)
    # The last fragment returned and its event: the position after it is that fragment's token.
    last_fragment: tuple[int, dict[str, str]] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    show_expanded: bool = False  # showExpandedEvents: DDL events and their fields
    run_pipeline: Callable[[dict[str, Any]], list[dict[str, Any]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.run_pipeline = compile_pipeline(self.pipeline)

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.coll}" if self.coll else f"{self.db}.$cmd.aggregate"

    def matches(self, record: ChangeRecord) -> bool:
        if record.op in expanded_events.EXPANDED_OPS and not self.show_expanded:
            return False
        if record.view and (not self.show_expanded or self.coll is not None):
            return False  # mongod derives view events from system.views writes: never on a collection stream
        if self.cluster:
            return record.db not in INTERNAL_DBS
        if record.db != self.db:
            return False
        if self.coll is None:
            return record.coll is None or not record.coll.startswith("system.")
        return record.coll == self.coll

    def invalidates(self, record: ChangeRecord) -> bool:
        if self.cluster:
            return False
        if self.coll is None:
            return record.op == "dropDatabase"
        return record.op in ("drop", "rename")


class Outgoing(NamedTuple):
    """A document for a batch, encoded once (the reply embeds the bytes as they are)."""

    seq: int  # the event it belongs to
    doc: RawBSONDocument
    token: dict[str, str]
    fragment: bool


def validate_pipeline(stages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The stages after $changeStream as mongomock runs them, and whether the last is the split stage.

    Parse errors first, as mongod parses the whole pipeline before it checks stage positions
    (`check_split_position`, called by the caller after the resume-token checks).
    """
    out = []
    split = False
    for stage in stages:
        if not isinstance(stage, dict) or len(stage) != 1:
            raise MongoError(40323, "A pipeline stage specification object must contain exactly one field.")
        name = next(iter(stage))
        if name == SPLIT_STAGE:
            if stage[name] != {}:
                raise MongoError(7182800, f"{SPLIT_STAGE} spec should be an empty object")
            split = True
            continue
        if name not in KNOWN_STAGES:
            raise MongoError(40324, f"Unrecognized pipeline stage name: '{name}'")
        if name == "$changeStream":
            raise MongoError(40602, "$changeStream is only valid as the first stage in a pipeline.")
        out.append(stage)
    for stage in out:
        name = next(iter(stage))
        if name not in ALLOWED_STAGES:
            raise MongoError(20, f"{name} is not permitted in a $changeStream pipeline")
    return translate_stages(out), split


def check_split_position(stages: list[dict[str, Any]]) -> None:
    """mongod: the split stage must be the last stage (a second one is therefore refused too)."""
    for index, stage in enumerate(stages):
        if isinstance(stage, dict) and SPLIT_STAGE in stage and index != len(stages) - 1:
            raise MongoError(7182802, f"{SPLIT_STAGE} must be the last stage in the pipeline")


def translate_stages(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rewrite stages mongomock lacks into equivalent ones it has."""
    out = []
    for stage in stages:
        name, spec = next(iter(stage.items()))
        if name == "$replaceWith":
            out.append({"$replaceRoot": {"newRoot": spec}})
        elif name == "$unset":
            fields = [spec] if isinstance(spec, str) else list(spec)
            out.append({"$project": dict.fromkeys(fields, 0)})
        elif name == "$redact":
            raise MongoError(115, "$redact is not supported by the MongoDB test server")
        else:
            out.append(stage)
    return out


def open_stream(
    log: EventLog,
    cursor_id: int,
    db: str,
    coll: str | None,
    spec: dict[str, Any],
    pipeline: list[dict[str, Any]],
) -> ChangeStream:
    """Validate $changeStream options and place the new stream in the log."""
    cluster = bool(spec.get("allChangesForCluster"))
    if cluster and (db != "admin" or coll is not None):
        raise MongoError(
            73,
            "A $changeStream with 'allChangesForCluster:true' may only be opened on the "
            "'admin' database, and with no collection name",
        )
    if not cluster and db == "admin":
        raise MongoError(73, "$changeStream may not be opened on the internal admin database")
    full_document = spec.get("fullDocument", "default")
    if full_document not in ("default", "updateLookup", "whenAvailable", "required"):
        raise MongoError(2, f"unknown full document type: '{full_document}'")
    before = spec.get("fullDocumentBeforeChange", "off")
    if before not in ("off", "whenAvailable", "required"):
        raise MongoError(2, f"unknown full document before change type: '{before}'")
    unknown = set(spec) - {
        "fullDocument",
        "fullDocumentBeforeChange",
        "resumeAfter",
        "startAfter",
        "startAtOperationTime",
        "allChangesForCluster",
        "showExpandedEvents",
        "allowToRunOnConfigDB",
        "allowToRunOnSystemNS",
    }
    if unknown:
        raise MongoError(40415, f"BSON field '$changeStream.{sorted(unknown)[0]}' is an unknown field.")
    starts = [k for k in ("resumeAfter", "startAfter", "startAtOperationTime") if k in spec]
    if len(starts) > 1:
        raise MongoError(40674, "Only one type of resume option is allowed, but multiple were found.")
    stages, split = validate_pipeline(pipeline)
    pos = None
    if "resumeAfter" in spec or "startAfter" in spec:
        pos = decode_token(spec.get("resumeAfter", spec.get("startAfter")))
        if pos.fragment >= 0 and not split:
            raise MongoError(
                280,
                "To resume from a split event, the $changeStream pipeline must include a "
                f"{SPLIT_STAGE} stage",
            )
    check_split_position(pipeline)
    resume_fragment = None
    with log.cond:
        min_ts = None
        if pos is not None:
            if pos.invalidate and "resumeAfter" in spec:
                raise MongoError(
                    260,
                    "Attempting to resume a change stream using 'resumeAfter' is not allowed "
                    "from an invalidate notification.",
                )
            # A fragment token needs its event again (its later fragments are what comes next).
            if pos.seq < log.trimmed_seq or (pos.fragment >= 0 and pos.seq <= log.trimmed_seq):
                raise history_lost()
            if pos.seq > log.last_seq:
                # Only a token from another server instance (e.g. before a restart) can be ahead of the log;
                # resuming from it would silently skip events, so refuse it.
                raise MongoError(
                    260,
                    f"resume token is ahead of this server's change history (event {pos.seq}"
                    f" > latest {log.last_seq}): it comes from another server instance",
                )
            seq = pos.seq
            if pos.fragment >= 0:
                seq, resume_fragment = pos.seq - 1, (pos.seq, pos.fragment)
        elif "startAtOperationTime" in spec:
            min_ts = spec["startAtOperationTime"]
            if not isinstance(min_ts, Timestamp):
                raise MongoError(14, "startAtOperationTime must be a Timestamp")
            if log.trimmed_ts is not None and log.trimmed_ts >= min_ts:
                raise history_lost()
            seq = log.trimmed_seq
        else:
            seq = log.last_seq
    return ChangeStream(
        cursor_id, db, coll, cluster, stages, full_document, before, seq, min_ts,
        split=split, resume_fragment=resume_fragment, show_expanded=spec.get("showExpandedEvents") is True,
        # Until a later document passes, the position is the fragment token resumed from.
        last_fragment=(pos.seq, pos.token()) if pos is not None and pos.fragment >= 0 else None,
    )  # fmt: skip


def history_lost() -> MongoError:
    return MongoError(
        286,
        "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
        labels=["NonResumableChangeStreamError"],
    )


Lookup = Callable[[str, str, dict[str, Any]], dict[str, Any] | None]


def next_batch(
    log: EventLog, stream: ChangeStream, batch_size: int | None, await_ms: int | None, lookup: Lookup
) -> tuple[list[RawBSONDocument], dict[str, str]]:
    """Events after the stream's position, waiting up to await_ms for the first one.

    Returns (batch, postBatchResumeToken). `lookup(db, coll, documentKey)` reads the current document
    for fullDocument: updateLookup; it takes the storage lock, so it is called without log.cond held.
    As on mongod, a batch holds at most `batch_size` documents and BSON_MAX_USER_SIZE bytes (its first
    document always fits); a document that does not fit waits in the stream's stash for the next batch.
    """
    limit = batch_size if batch_size and batch_size > 0 else 1_000_000
    deadline = time.monotonic() + (await_ms or 0) / 1000
    batch: list[Outgoing] = []
    used = _drain(stream, batch, limit, 0)
    while True:
        with log.cond:
            if stream.seq < log.trimmed_seq:
                raise history_lost()
            pending = log._after(stream.seq)
            while not pending and not batch and await_ms and not log.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                log.cond.wait(remaining)
                pending = log._after(stream.seq)
        for event in pending:
            if len(batch) >= limit or stream.invalidated or stream.stash:
                break
            stream.seq = event.seq
            if (stream.min_ts is not None and event.ts < stream.min_ts) or not stream.matches(event.record):
                _check_resumed_fragment(stream, event)
                continue
            doc = build_event(event, stream, lookup)
            for result in stream.run_pipeline(doc):
                stream.stash.extend(_outgoing(stream, event, result))
            _check_resumed_fragment(stream, event)
            if stream.invalidates(event.record):
                stream.invalidated = True
                inv_pos = event.position(invalidate=True)
                invalidate = {
                    "_id": inv_pos.token(),
                    "operationType": "invalidate",
                    "clusterTime": event.ts,
                    "wallTime": event.wall,
                }
                for result in stream.run_pipeline(invalidate):
                    stream.stash.extend(_outgoing(stream, event, result))
            # The batch that carries the invalidation closes the cursor: nothing may stay behind.
            used = _drain(stream, batch, limit, used, everything=stream.invalidated)
        if batch or stream.invalidated or not await_ms or time.monotonic() >= deadline or log.closed:
            break
    with log.cond:
        if stream.invalidated:
            pbrt = log._position_of(stream.seq)
            token = Position(pbrt.ts_seconds, pbrt.ts_inc, pbrt.seq, True).token()
        elif stream.stash:
            token = batch[-1].token  # mid-event or mid-batch: resume right after the last one returned
        elif stream.last_fragment is not None and (
            stream.last_fragment[0] == stream.seq or stream.resume_fragment is not None
        ):
            token = stream.last_fragment[1]  # inside or after a split event: the last fragment passed
        else:
            token = log._position_of(stream.seq).token()
    return [item.doc for item in batch], token


def _drain(
    stream: ChangeStream, batch: list[Outgoing], limit: int, used: int, everything: bool = False
) -> int:
    """Move stashed documents into the batch while they fit; returns the bytes the batch holds."""
    while stream.stash:
        item = stream.stash[0]
        size = len(item.doc.raw)
        if batch and not everything and (len(batch) >= limit or used + size > BSON_MAX_USER_SIZE):
            break
        batch.append(stream.stash.popleft())
        used += size
        if item.fragment:
            stream.last_fragment = (item.seq, item.token)
    return used


def _outgoing(stream: ChangeStream, event: Event, result: dict[str, Any]) -> list[Outgoing]:
    """One pipeline result as the documents the cursor returns: itself, or its fragments."""
    raw = bson.encode(result)
    size = len(raw)
    resuming = stream.resume_fragment is not None and stream.resume_fragment[0] == event.seq
    if not stream.split:
        if size > BSON_MAX_INTERNAL_SIZE:
            raise bson_object_too_large(size, f'_id: {{ _data: "{result["_id"].get("_data")}" }}')
        return [Outgoing(event.seq, RawBSONDocument(raw), result["_id"], False)]
    if size <= MAX_CHANGE_EVENT_SIZE:
        if resuming:
            raise MongoError(
                280,
                "Attempted to resume from a split event fragment, but the event in the resumed stream "
                "was not large enough to be split",
            )
        return [Outgoing(event.seq, RawBSONDocument(raw), result["_id"], False)]
    fragments = split_event(result, decode_token(result["_id"]))
    if resuming:
        assert stream.resume_fragment is not None
        resumed_from = stream.resume_fragment[1]
        stream.resume_fragment = None
        if resumed_from >= len(fragments):
            raise MongoError(
                280,
                "Attempted to resume from a split event, but the resumed stream produced a different "
                "split. Ensure that the pipeline used to resume is the same as the original",
            )
        # Fragments up to the resume token's were returned before.
        fragments = fragments[resumed_from + 1 :]
    return [Outgoing(event.seq, RawBSONDocument(bson.encode(f)), f["_id"], True) for f in fragments]


def _check_resumed_fragment(stream: ChangeStream, event: Event) -> None:
    """The event of a fragment token must come out of the pipeline again, split, to resume inside it."""
    if stream.resume_fragment is not None and event.seq >= stream.resume_fragment[0]:
        seq, fragment = stream.resume_fragment
        raise MongoError(
            280,
            "cannot resume stream; the resume token was not found. "
            f"{Position(event.ts.time, event.ts.inc, seq, fragment=fragment).token()}",
        )


def split_event(event: dict[str, Any], position: Position) -> list[dict[str, Any]]:
    """An event over MAX_CHANGE_EVENT_SIZE as $changeStreamSplitLargeEvent's fragments.

    mongod's algorithm (change_stream_split_event_helpers.cpp): the top-level fields but `_id`,
    ordered by (BSON size, name), go greedily into fragments, so the first fragment holds as many
    fields as possible; each fragment is `{_id: <its own token>, splitEvent: {fragment: n, of: total},
    ...fields}` and is at most MAX_CHANGE_EVENT_SIZE minus the event token's size. Sub-documents are
    never split: a single field too large for a fragment fails with 7182500.
    """
    fields = sorted(
        (len(bson.encode({key: value})) - 5, key) for key, value in event.items() if key != "_id"
    )  # - 5: the document's own length prefix and terminator
    max_size = MAX_CHANGE_EVENT_SIZE - len(bson.encode(event["_id"]))
    fragments: list[dict[str, Any]] = []
    index = 0
    while index < len(fields):
        token = dataclasses.replace(position, fragment=len(fragments)).token()
        fragment: dict[str, Any] = {"_id": token, "splitEvent": {"fragment": len(fragments) + 1, "of": 0}}
        # mongod counts the fragment with its sort-key metadata, a copy of the token.
        used = len(bson.encode({**fragment, "$sortKey": [token]}))
        while True:
            size, key = fields[index]
            fragment[key] = event[key]
            used += size
            index += 1
            if index == len(fields) or used + fields[index][0] > max_size:
                break
        if used > max_size:
            raise MongoError(
                7182500,
                f"Splitting change event failed: fragment size {used} is greater than maximum "
                f"allowed fragment size {max_size}",
            )
        fragments.append(fragment)
    for fragment in fragments:
        fragment["splitEvent"]["of"] = len(fragments)
    return fragments


def compile_pipeline(stages: list[dict[str, Any]]) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """The stream's pipeline as a function of one event.

    A pipeline of `$match` stages only (what listeners send) runs the match predicates directly
    (compile_match, prepared once per stream instead of once per event): the same
    answers as `apply_pipeline`, without mongomock's pipeline machinery on every event.
    """
    if not stages or any(next(iter(stage)) != "$match" for stage in stages):
        return lambda doc: apply_pipeline(doc, stages)
    predicates = [compile_match(stage["$match"]) for stage in stages]

    def match(doc: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            return [doc] if all(predicate(doc) for predicate in predicates) else []
        except MongoError:
            raise
        except Exception as exc:
            raise _pipeline_error(exc) from exc

    return match


def _pipeline_error(exc: Exception) -> MongoError:
    """What the server answers when mongomock fails on a stage: unsupported (115) or a bad value (2)."""
    if isinstance(exc, NotImplementedError):
        return MongoError(115, f"not supported by the MongoDB test server: {exc}")
    return MongoError(2, f"{type(exc).__name__}: {exc}")


def apply_pipeline(doc: dict[str, Any], stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not stages:
        return [doc]
    try:
        out = [doc]
        for stage in stages:
            # $match as mongod evaluates it (decimals, $expr); the other stages are mongomock's.
            if "$match" in stage:
                predicate = compile_match(stage["$match"])
                out = [result for result in out if predicate(result)]
            else:
                out = list(process_pipeline(out, None, [stage], None))
    except MongoError:
        raise
    except Exception as exc:
        raise _pipeline_error(exc) from exc
    for result in out:
        if result.get("_id") != doc["_id"]:
            raise MongoError(
                280,
                "Encountered an event whose _id field, which contains the resume token, was "
                "modified by the pipeline. Modifying the _id field of an event makes it "
                "impossible to resume the stream from that point.",
            )
    return out


def build_event(event: Event, stream: ChangeStream, lookup: Lookup) -> dict[str, Any]:
    """The event document, field by field in mongod 7.0's order."""
    rec = event.record
    doc: dict[str, Any] = {
        "_id": event.position().token(),
        "operationType": rec.op,
        "clusterTime": event.ts,
        "wallTime": event.wall,
    }
    if rec.op in ("insert", "replace"):
        doc["fullDocument"] = rec.full_document
    if rec.op == "dropDatabase":
        doc["ns"] = {"db": rec.db}
    else:
        doc["ns"] = {"db": rec.db, "coll": rec.coll}
    if rec.op == "rename":
        doc["to"] = rec.to
    if rec.document_key is not None:
        doc["documentKey"] = rec.document_key
    if rec.op == "update":
        doc["updateDescription"] = rec.update_description
        if stream.show_expanded:
            # mongod 7.0 reports disambiguatedPaths only with showExpandedEvents, then always (maybe {}).
            doc["updateDescription"] = {
                **(rec.update_description or {}),
                "disambiguatedPaths": rec.disambiguated_paths or {},
            }
        if stream.full_document == "updateLookup":
            doc["fullDocument"] = lookup(rec.db, rec.coll or "", rec.document_key or {})
        elif stream.full_document in ("whenAvailable", "required"):
            if rec.images_enabled:
                doc["fullDocument"] = rec.full_document
            elif stream.full_document == "required":
                raise MongoError(
                    47,
                    "Change stream was configured to require a post-image for all update, "
                    f"delete and replace events, but the post-image was not found for event: "
                    f"{doc['_id']}",
                )
            else:
                doc["fullDocument"] = None
    if rec.op in ("update", "replace", "delete") and stream.before_change != "off":
        if rec.images_enabled:
            doc["fullDocumentBeforeChange"] = rec.pre_image
        elif stream.before_change == "required":
            raise MongoError(
                47,
                "Change stream was configured to require a pre-image for all update, delete "
                f"and replace events, but the pre-image was not found for event: {doc['_id']}",
            )
        else:
            doc["fullDocumentBeforeChange"] = None
    if event.lsid is not None:
        # mongod adds uid, the SHA-256 of the (here: no) authenticated user, to the client's lsid.
        doc["lsid"] = {"id": event.lsid.get("id"), "uid": NO_USER_UID}
        doc["txnNumber"] = event.txn_number
    if stream.show_expanded:
        return expanded_events.add_fields(doc, rec)
    return doc
