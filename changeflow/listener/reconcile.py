"""`python -m listener reconcile`: re-emit events for documents written inside a gap of lost history.

A gap (`changeflow_gaps`, changeflow/listener/gaps.py) is a stretch of the oplog the listener never read. The
change events are gone; what is left is the data. Reconcile finds the documents of the routed
collections that were written inside the window and publishes *synthetic* events for them, through
the listener's publisher (same message shape and serializer, unpublishable ones dead-lettered):

- insert routes: every document whose ObjectId `_id` was generated inside the window (its first 4
  bytes, whole seconds), plus, where the route names `changed_at`, every document whose `changed_at`
  date falls inside the window (for documents with a non-ObjectId _id; the field must then be the
  creation time). Emitted as `operationType: "insert"`, `fullDocument` = the document as it is now;
- update routes with `changed_at`: every document (not created inside the window) whose `changed_at`
  falls inside it, emitted once as `operationType: "update"` with `updateDescription.updatedFields`
  holding the route's `FieldChanged` field with its current value.

Synthetic resume tokens are stable, so running reconcile again publishes the same task ids (the
workers' dedup guard runs each once): `{"_data": "reconcile:<coll>:<_id>"}` for an insert,
`{"_data": "reconcile:<coll>:<_id>:update:<changed_at ISO>"}` for an update.

What it cannot recover: deletes; updates to documents created before the window on collections
without `changed_at`; several updates of one document (one event, with the current state); the
intermediate states of any document.

At the window's end, documents created inside it whose insert event the resumed stream delivered
(written late, or created in its last seconds) are left out. The listener notes such inserts of the
window's last minute in the gap record (`to.delivered`) before it saves each checkpoint; reconcile
reads the stream's checkpoint, then those notes, then looks up the inserts of documents created in
the window's last seconds in the oplog after the gap's `to.token`, or, once that has left the oplog,
after the checkpoint (whatever the listener delivered before it is noted). Only if both have left
the oplog are those emitted, a second time. At its start nothing can be checked (that history is
lost): a document created in the window's first (partial) second whose real event was delivered
before the gap gets its tasks a second time, under a different task id. Check with --dry-run.

Exit codes: 0 done (or dry run), 1 broker or MongoDB unavailable (rerunning is safe: same task ids),
2 usage (bad flags or settings, unknown gap, gap without an end yet).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from changeflow.listener.gaps import as_utc

if TYPE_CHECKING:
    from pymongo.database import Database

    from changeflow.listener.publish import Message, Publisher
    from changeflow.listener.routes import Route

EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2

log = logging.getLogger("listener.reconcile")


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Synthetic:
    event: dict[str, Any]
    messages: list[Message]


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date-time: {text!r}") from None
    return as_utc(value)


def _id_text(value: Any) -> str:
    from bson import ObjectId

    return str(value) if isinstance(value, ObjectId | str) else repr(value)


def window_of_gap(gap: Mapping[str, Any]) -> tuple[datetime, datetime]:
    start = (gap.get("from") or {}).get("time")
    end = gap.get("to") or {}
    if not isinstance(start, datetime):
        raise UsageError(f"gap {gap['_id']} has no start time: give --since/--until instead")
    if end.get("token") is None or not isinstance(end.get("time"), datetime):
        raise UsageError(
            f"gap {gap['_id']} has no end yet: no listener resumed after it. Start the listener with "
            "--on-history-lost=resume-now first (or give --since/--until)"
        )
    return as_utc(start), as_utc(end["time"])


def synthetic_events(
    db: Database,
    routes: Sequence[Route],
    since: datetime,
    until: datetime,
    resumed_at: Sequence[Mapping[str, Any]] = (),
    out: Any = None,
    noted: Sequence[Mapping[str, Any]] = (),
) -> Iterator[Synthetic]:
    """The synthetic events of documents written in [since, until], collection by collection.

    Documents whose insert event the resumed stream delivered are left out: those in `noted` (the
    gap's `to.delivered`), and those created in the window's last seconds whose insert is in the
    oplog after one of the `resumed_at` tokens (the first one still there: the gap's end, then the
    checkpoint).
    """
    from bson import ObjectId

    from changeflow.listener.publish import messages_for

    collections = list(dict.fromkeys(route.collection for route in routes))
    for name in collections:
        collection = db[name]
        inserts = [r for r in routes if r.collection == name and "insert" in r.operation_types]
        updates = [
            r for r in routes if r.collection == name and "update" in r.operation_types and r.changed_at
        ]
        created: set[str] = set()
        if inserts:
            # ObjectIds hold whole seconds: the window's first second is included entirely (see above).
            low = ObjectId.from_datetime(since.replace(microsecond=0))
            high = ObjectId.from_datetime(until.replace(microsecond=0) + timedelta(seconds=1))
            found: list[tuple[Any, datetime]] = [
                (doc, doc["_id"].generation_time)
                for doc in collection.find({"_id": {"$gte": low, "$lt": high}}).sort("_id", 1)
                if isinstance(doc["_id"], ObjectId)
            ]
            for field in dict.fromkeys(r.changed_at for r in inserts if r.changed_at):
                assert field is not None
                for doc in collection.find({field: {"$gte": since, "$lte": until}}).sort(field, 1):
                    found.append((doc, as_utc(doc[field])))
            edge = until.replace(microsecond=0) - timedelta(seconds=1)
            delivered = {_id_text(each["id"]) for each in noted if each.get("coll") == name}
            delivered |= delivered_after(
                db, name, [doc["_id"] for doc, when in found if when >= edge], resumed_at
            )
            for doc, when in found:
                key = _id_text(doc["_id"])
                if key in created:
                    continue
                if key in delivered:
                    if out is not None:
                        print(f"skip insert {name}/{key}: delivered by the resumed stream", file=out)
                    continue
                created.add(key)
                event = _event(db.name, name, doc, "insert", f"reconcile:{name}:{key}", when)
                if messages := messages_for(event, routes, ordered=False):
                    yield Synthetic(event, messages)
        for route in updates:
            field = route.changed_at
            assert field is not None
            for doc in collection.find({field: {"$gte": since, "$lte": until}}).sort(field, 1):
                key = _id_text(doc["_id"])
                if key in created:
                    continue  # its insert carries the current state already
                when = as_utc(doc[field])
                updated = (
                    {route.when.field: doc[route.when.field]}
                    if route.when and route.when.field in doc
                    else {}
                )
                event = _event(
                    db.name, name, doc, "update", f"reconcile:{name}:{key}:update:{when.isoformat()}", when
                )
                event["updateDescription"] = {
                    "updatedFields": updated,
                    "removedFields": [],
                    "truncatedArrays": [],
                }
                if messages := messages_for(event, routes, ordered=False):
                    yield Synthetic(event, messages)


def delivered_after(
    db: Database, collection: str, ids: Sequence[Any], tokens: Sequence[Mapping[str, Any]]
) -> set[str]:
    """Which of `ids` have an insert event on `collection` after the first of `tokens` in the oplog.

    Reads the oplog from that token up to now, filtered server-side. If no token is in the oplog any
    more nothing can be told: an empty set (those documents are emitted, possibly a second time).
    """
    from pymongo.errors import OperationFailure

    if not ids:
        return set()
    pipeline = [
        {"$match": {"ns.coll": collection, "operationType": "insert", "documentKey._id": {"$in": list(ids)}}}
    ]
    for token in tokens:
        found: set[str] = set()
        try:
            with db.watch(pipeline, start_after=dict(token), max_await_time_ms=200) as stream:
                while (event := stream.try_next()) is not None:
                    found.add(_id_text(event["documentKey"]["_id"]))
        except OperationFailure as exc:
            log.info("cannot read %s inserts after %s: %s", collection, token, exc)
            continue
        return found
    if tokens:
        log.warning(
            "cannot check %s inserts after the gap's end or the checkpoint (both left the oplog): "
            "emitting the window's last seconds' documents not noted as delivered",
            collection,
        )
    return set()


def _event(
    db: str, coll: str, doc: Mapping[str, Any], kind: str, data: str, when: datetime
) -> dict[str, Any]:
    return {
        "_id": {"_data": data},
        "operationType": kind,
        "ns": {"db": db, "coll": coll},
        "documentKey": {"_id": doc["_id"]},
        "fullDocument": dict(doc),
        "wallTime": when,
    }


def reconcile(
    db: Database,
    publisher: Publisher,
    routes: Sequence[Route],
    since: datetime,
    until: datetime,
    *,
    resumed_at: Sequence[Mapping[str, Any]] = (),
    noted: Sequence[Mapping[str, Any]] = (),
    dry_run: bool = False,
    batch_size: int = 500,
    out: Any = sys.stdout,
) -> dict[str, int]:
    """Publish the window's synthetic events; returns counts. Raises BrokerUnavailable, PyMongoError."""
    from changeflow.listener.publish import record_unpublishable

    counts = {"events": 0, "tasks": 0, "dead_letters": 0}
    batch: list[Message] = []

    def flush() -> None:
        rejected = publisher.publish(batch)
        for each in rejected:
            record_unpublishable(db, each)
        counts["tasks"] += len(batch) - len(rejected)
        counts["dead_letters"] += len(rejected)
        batch.clear()

    for synthetic in synthetic_events(db, routes, since, until, resumed_at, out, noted):
        counts["events"] += 1
        event = synthetic.event
        tasks = ", ".join(m.task_name for m in synthetic.messages)
        coll, key = event["ns"]["coll"], _id_text(event["documentKey"]["_id"])
        print(
            f"{'would emit' if dry_run else 'emit'} {event['operationType']} {coll}/{key} "
            f"({event['wallTime'].isoformat()}): {tasks}",
            file=out,
        )
        if dry_run:
            counts["tasks"] += len(synthetic.messages)
            continue
        batch.extend(synthetic.messages)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m listener reconcile",
        description="Re-emit synthetic events for documents written inside a gap of lost change stream "
        "history (changeflow_gaps), or inside a time window. See docs/listener.md for what it can and "
        "cannot recover.",
        epilog="exit codes: 0 done, 1 broker or MongoDB unavailable (rerun: same task ids), 2 usage",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--gap", metavar="ID", help="a gap id from `python -m listener gaps`; marked resolved")
    which.add_argument(
        "--since", type=_timestamp, metavar="ISO", help="window start (UTC unless a zone is given)"
    )
    parser.add_argument(
        "--until", type=_timestamp, metavar="ISO", help="window end, with --since (default: now)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would be emitted; publish nothing")
    return parser


def main(argv: Sequence[str] | None = None, out: Any = sys.stdout, *, app: str | None = None) -> int:
    """Run `reconcile` for the changeflow app `app` names (-A; default CHANGEFLOW_APP, else `worker`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.until is not None and args.since is None:
        parser.error("--until goes with --since")
    logging.basicConfig(
        level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import pymongo
        from pymongo.errors import ConfigurationError, PyMongoError

        from changeflow.app import load_app
        from changeflow.listener.checkpoints import CheckpointStore
        from changeflow.listener.gaps import GapStore
        from changeflow.listener.publish import BrokerUnavailable, make_publisher
        from changeflow.worker.serialization import MONGO_CLIENT_OPTIONS

        changeflow_app = load_app(app)  # its settings (from the environment), routes and Celery app
        settings = changeflow_app.settings
        client: pymongo.MongoClient = pymongo.MongoClient(
            settings.mongodb_uri,
            appname="changeflow-reconcile",
            serverSelectionTimeoutMS=5_000,
            **MONGO_CLIENT_OPTIONS,
        )
    except (ValueError, ConfigurationError) as exc:
        what = "app" if type(exc).__name__ == "AppError" else "settings"  # changeflow.app.AppError
        print(f"invalid {what}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    db = client[settings.mongodb_db]
    gaps = GapStore(db)
    try:
        if args.gap is not None:
            gap = gaps.get(args.gap)
            if gap is None:
                raise UsageError(f"no gap {args.gap!r} in {gaps.collection.name}")
            since, until = window_of_gap(gap)
            # In this order: the checkpoint, then the notes of inserts the listener delivered before it
            # (it notes before it saves), then (synthetic_events) the oplog after the checkpoint.
            checkpoint = CheckpointStore(db).load(gap["stream"])
            noted = (gaps.get(args.gap) or gap)["to"].get("delivered") or []
            resumed_at = [gap["to"]["token"], *([checkpoint] if checkpoint else [])]
            if gap.get("resolved"):
                print(f"note: gap {args.gap} was already resolved; emitting again (same task ids)", file=out)
        else:
            since, until = args.since, args.until or datetime.now(UTC)
            resumed_at, noted = [], []
        if until < since:
            raise UsageError(f"empty window: {until.isoformat()} is before {since.isoformat()}")
        counts = reconcile(
            db, make_publisher(settings, changeflow_app), changeflow_app.routes, since, until,
            resumed_at=resumed_at, noted=noted,
            dry_run=args.dry_run, batch_size=settings.listener_batch_size, out=out,
        )  # fmt: skip
        verb = "would publish" if args.dry_run else "published"
        summary = (
            f"reconcile {since.isoformat()} .. {until.isoformat()}: {counts['events']} events, "
            f"{verb} {counts['tasks']} tasks, {counts['dead_letters']} dead-lettered"
        )
        if args.gap is not None and not args.dry_run:
            gaps.resolve(
                args.gap,
                {
                    "method": "reconcile",
                    "at": datetime.now(UTC),
                    "since": since,
                    "until": until,
                    **counts,
                },
            )
            summary += f"; gap {args.gap} marked resolved"
        print(summary, file=out)
        return EXIT_OK
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokerUnavailable as exc:
        print(f"broker unavailable: {exc} (nothing is lost: run it again, same task ids)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PyMongoError as exc:
        print(f"MongoDB unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        client.close()
