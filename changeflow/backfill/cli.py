"""`changeflow backfill`: run one task of the app over existing documents, resume it, list what ran.

    changeflow backfill -A APP --collection C --task T [--filter JSON] [--batch N]
                        [--rate EVENTS_PER_S] [--dry-run]
    changeflow backfill resume ID [--force]
    changeflow backfill list [--limit N]
    changeflow backfill show ID

Exit codes: 0 done (or dry run, or nothing left to resume), 1 MongoDB unavailable or a crash (the
position of the last published batch is saved: resume), 2 usage (bad flags or settings, unknown
task or backfill id, a bad --filter, a backfill still running), 130 interrupted by SIGINT/SIGTERM
(position saved: resume). See docs/backfill.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

from changeflow.listener.exit_codes import EXIT_CRASH, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    import pymongo
    from pymongo.database import Database

    from changeflow.app import Changeflow
    from changeflow.backfill.runner import Job
    from changeflow.backfill.store import BackfillStore
    from changeflow.worker.settings import Settings

EXIT_UNAVAILABLE = 1
ACTIONS = ("resume", "list", "show")
DRY_RUN_SAMPLE = 5

log = logging.getLogger("changeflow.backfill")


class UsageError(Exception):
    pass


# -- parsing -------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_filter(text: str | None) -> dict[str, Any]:
    """The `--filter` query: a JSON object in MongoDB Extended JSON ({"_id": {"$oid": "..."}})."""
    if text is None:
        return {}
    from bson import json_util

    try:
        value = json_util.loads(text)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--filter is not valid (Extended) JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--filter must be a JSON object (a MongoDB query), got {type(value).__name__}")
    return value


def filter_text(query: Mapping[str, Any]) -> str:
    """The query as canonical Extended JSON: what the record stores and the commands show."""
    from bson import json_util

    return json_util.dumps(query, json_options=json_util.CANONICAL_JSON_OPTIONS)


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="changeflow backfill",
        description="Run task T of the app over the existing documents of collection C, as insert "
        "events published like live ones (dedup guard, dead letters). Also: `changeflow backfill "
        "resume ID`, `list`, `show ID`. See docs/backfill.md.",
        epilog="exit codes: 0 done, 1 MongoDB unavailable (resume), 2 usage, 130 interrupted (resume)",
    )
    parser.add_argument("--collection", required=True, metavar="C", help="the collection to read")
    parser.add_argument("--task", required=True, metavar="T", help="a task of the app (its full name)")
    parser.add_argument(
        "--filter", metavar="JSON", help='a MongoDB query in Extended JSON (default: every document), e.g. '
        '\'{"plan": "pro", "created": {"$lt": {"$date": "2026-01-01T00:00:00Z"}}}\'',
    )  # fmt: skip
    parser.add_argument(
        "--batch", type=_positive_int, metavar="N",
        help="documents per read and per saved position (default: LISTENER_BATCH_SIZE)",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=_positive_float, metavar="EVENTS_PER_S", help="publish at most this many events/s"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count and show what would run; publish and record nothing"
    )
    return parser


def action_parser(action: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"changeflow backfill {action}")
    if action in ("resume", "show"):
        parser.add_argument("id", metavar="ID", help="a backfill id (changeflow backfill list)")
    if action == "resume":
        parser.add_argument(
            "--force", action="store_true",
            help="take over a backfill recorded as running whose process cannot be seen from here "
            "(another machine) and is known to be gone",
        )  # fmt: skip
    if action == "list":
        parser.add_argument("--limit", type=_positive_int, default=20, help="most recent N (default: 20)")
    return parser


# -- formatting ----------------------------------------------------------------------------------


def _when(value: object) -> str:
    if not isinstance(value, datetime):
        return "" if value is None else str(value)
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def shown_state(record: Mapping[str, Any], owner_gone: bool) -> str:
    """The state to show: a "running" record whose process is gone was interrupted (killed)."""
    state = str(record.get("state", ""))
    return "interrupted" if state == "running" and owner_gone else state


def id_shown(value: Any) -> str:
    """An `_id` for a human: relaxed Extended JSON (1, "a", {"$oid": "..."})."""
    from bson import json_util

    return json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS)


def position_text(record: Mapping[str, Any]) -> str:
    if not record.get("started"):
        return "(none yet)"
    return id_shown(record.get("last_id"))


def mongo_error(exc: Exception) -> str:
    """A MongoDB error's own message, without the reply document pymongo appends."""
    details = getattr(exc, "details", None)
    message = details.get("errmsg") if isinstance(details, Mapping) else None
    return _scrub(str(message or exc))


def resume_command(backfill_id: str, app: str | None = None) -> str:
    return f"changeflow backfill{f' -A {app}' if app else ''} resume {backfill_id}"


def table(records: Sequence[Mapping[str, Any]], gone: Sequence[bool]) -> str:
    header = (
        "ID", "STATE", "COLLECTION", "TASK", "PUBLISHED/TOTAL", "DEAD",
        "STARTED", "ENDED", "LAST_ID", "FILTER",
    )  # fmt: skip
    rows = [
        (
            str(r["_id"]),
            shown_state(r, g),
            str(r.get("collection", "")),
            str(r.get("task", "")),
            f"{(r.get('counts') or {}).get('published', 0)}/{r.get('total', '?')}",
            str((r.get("counts") or {}).get("dead_lettered", 0)),
            _when(r.get("started_at")),
            _when(r.get("ended_at")),
            position_text(r),
            str(r.get("filter", "")),
        )
        for r, g in zip(records, gone, strict=True)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
        for row in [header, *rows]
    )


def describe(record: Mapping[str, Any], owner_gone: bool) -> str:
    counts = record.get("counts") or {}
    lines = [
        f"id:          {record['_id']}",
        f"state:       {shown_state(record, owner_gone)}"
        + (" (its process is gone)" if owner_gone and record.get("state") == "running" else ""),
        f"app:         {record.get('app')}",
        f"collection:  {record.get('collection')}",
        f"task:        {record.get('task')}",
        f"filter:      {record.get('filter')}",
        f"batch:       {record.get('batch')}   rate: {record.get('rate') or 'unlimited'} events/s",
        f"published:   {counts.get('published', 0)} of {record.get('total')} "
        f"(dead-lettered {counts.get('dead_lettered', 0)})",
        f"last _id:    {position_text(record)}",
        f"runs:        {record.get('runs')}   owner: {record.get('owner')}",
        f"started:     {_when(record.get('started_at'))}",
        f"updated:     {_when(record.get('updated_at'))}",
        f"ended:       {_when(record.get('ended_at'))}",
    ]
    if record.get("error"):
        lines.append(f"error:       {record['error']}")
    if record.get("state") != "done":
        lines.append(f"resume with: {resume_command(str(record['_id']), record.get('app'))}")
    return "\n".join(lines)


# -- commands ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, out: Any = sys.stdout, *, app: str | None = None) -> int:
    """`changeflow backfill ...` for the app `app` names (-A; default CHANGEFLOW_APP, else worker)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    action = argv[0] if argv and argv[0] in ACTIONS else "run"
    args = (run_parser() if action == "run" else action_parser(action)).parse_args(
        argv if action == "run" else argv[1:]
    )
    logging.basicConfig(
        level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    client: pymongo.MongoClient | None = None
    try:
        import pymongo
        from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError

        from changeflow.backfill.store import BackfillStore
        from changeflow.worker.serialization import MONGO_CLIENT_OPTIONS
        from changeflow.worker.settings import get_settings

        try:
            settings = get_settings()
            client = pymongo.MongoClient(
                settings.mongodb_uri, appname="changeflow-backfill", serverSelectionTimeoutMS=10_000,
                **MONGO_CLIENT_OPTIONS,
            )  # fmt: skip
        except (ValueError, ConfigurationError) as exc:
            raise UsageError(f"invalid settings: {_scrub(str(exc))}") from None
        db = client[settings.mongodb_db]
        store = BackfillStore(db)
        try:
            if action == "list":
                return _list(store, args.limit, out)
            if action == "show":
                return _show(store, args.id, out)
            if action == "resume":
                return _resume(db, store, args.id, args.force, app, out)
            return _run(db, store, args, app, out)
        except OperationFailure as exc:
            if action == "run" and exc.code in (2, 9):  # BadValue, FailedToParse: the --filter
                raise UsageError(f"MongoDB refuses the --filter: {mongo_error(exc)}") from None
            print(f"MongoDB error: {mongo_error(exc)}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        except PyMongoError as exc:
            print(f"MongoDB unavailable: {_scrub(str(exc))}", file=sys.stderr)
            return EXIT_UNAVAILABLE
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if client is not None:
            client.close()


def _scrub(text: str) -> str:
    from changeflow.worker.settings import scrub

    return scrub(text)


def _load_app(spec: str | None) -> Changeflow:
    from changeflow.app import load_app

    try:
        return load_app(spec)
    except ValueError as exc:  # AppError, SettingsError
        what = "app" if type(exc).__name__ == "AppError" else "settings"
        raise UsageError(f"invalid {what}: {_scrub(str(exc))}") from None


def _check_task(app: Changeflow, task: str) -> None:
    if task not in app.tasks or task.startswith("celery."):
        own = sorted(name for name in app.tasks if not name.startswith("celery."))
        raise UsageError(f"app {app.main!r} has no task {task!r} (its tasks: {', '.join(own) or 'none'})")


def _list(store: BackfillStore, limit: int, out: Any) -> int:
    from changeflow.backfill.store import owner_is_gone

    records = store.recent(limit)
    if not records:
        print(f"no backfills in {store.collection.name}", file=out)
        return EXIT_OK
    print(table(records, [owner_is_gone(r.get("owner")) for r in records]), file=out)
    return EXIT_OK


def _show(store: BackfillStore, backfill_id: str, out: Any) -> int:
    from changeflow.backfill.store import owner_is_gone

    record = store.get(backfill_id)
    if record is None:
        raise UsageError(f"no backfill {backfill_id!r} in {store.collection.name} (changeflow backfill list)")
    print(describe(record, owner_is_gone(record.get("owner"))), file=out)
    return EXIT_OK


def _run(db: Database, store: BackfillStore, args: argparse.Namespace, app_spec: str | None, out: Any) -> int:
    from changeflow.backfill.runner import Job
    from changeflow.worker.settings import default_app_spec

    query = parse_filter(args.filter)
    app = _load_app(app_spec)
    _check_task(app, args.task)
    settings = app.settings
    batch = args.batch or settings.listener_batch_size
    total = db[args.collection].count_documents(query)
    text = filter_text(query)
    if args.dry_run:
        return _dry_run(db, args, query, text, batch, total, out)
    record = store.create(
        app=app_spec or default_app_spec(), collection=args.collection, task=args.task,
        filter_text=text, batch=batch, rate=args.rate, total=total,
    )  # fmt: skip
    print(
        f"backfill {record['_id']}: {args.task} over {args.collection} (filter {text}): {total} documents",
        file=out, flush=True,
    )  # fmt: skip
    job = Job(record["_id"], args.collection, args.task, query, batch, args.rate)
    return _execute(db, store, app, settings, job, total, record["app"], out)


def _dry_run(
    db: Database, args: argparse.Namespace, query: dict[str, Any], text: str, batch: int, total: int, out: Any
) -> int:
    cursor = db[args.collection].find(query, {"_id": 1}).sort("_id", 1).limit(DRY_RUN_SAMPLE)
    first = [doc["_id"] for doc in cursor]
    took = f", about {total / args.rate:.0f}s at {args.rate:g} events/s" if args.rate else ""
    print(
        f"dry run: would publish {total} events ({args.task} over {args.collection}, filter {text}) "
        f"in {-(-total // batch)} batches of {batch}{took}",
        file=out,
    )
    for document_id in first:
        print(f"  would emit insert {args.collection}/{id_shown(document_id)}: {args.task}", file=out)
    if total > len(first):
        print(f"  ... and {total - len(first)} more", file=out)
    return EXIT_OK


def _resume(
    db: Database, store: BackfillStore, backfill_id: str, force: bool, app_spec: str | None, out: Any
) -> int:
    from changeflow.backfill.position import page_query
    from changeflow.backfill.runner import Job
    from changeflow.backfill.store import DONE, RUNNING, owner_is_gone

    record = store.get(backfill_id)
    if record is None:
        raise UsageError(f"no backfill {backfill_id!r} in {store.collection.name} (changeflow backfill list)")
    if record.get("state") == DONE:
        ended = _when(record.get("ended_at"))
        print(f"backfill {backfill_id} is done already (ended {ended}): nothing to resume", file=out)
        return EXIT_OK
    if record.get("state") == RUNNING and not owner_is_gone(record.get("owner")) and not force:
        raise UsageError(
            f"backfill {backfill_id} is running (process {record.get('owner')}, last saved "
            f"{_when(record.get('updated_at'))}); stop it first, or, if that process is gone, "
            "resume with --force"
        )
    spec = app_spec or record.get("app")
    app = _load_app(spec)
    _check_task(app, record["task"])
    query = parse_filter(record["filter"])
    started, last_id = bool(record.get("started")), record.get("last_id")
    counts = {"published": 0, "dead_lettered": 0, **(record.get("counts") or {})}
    left = db[record["collection"]].count_documents(page_query(query, last_id, started=started))
    taken = store.take_over(record, total=counts["published"] + left)
    if taken is None:
        raise UsageError(f"backfill {backfill_id} changed while resuming it (another resume?): look again")
    print(
        f"backfill {backfill_id}: resuming {record['task']} over {record['collection']} after _id "
        f"{position_text(record)}: {left} documents left, {counts['published']} published before",
        file=out, flush=True,
    )  # fmt: skip
    job = Job(
        backfill_id, record["collection"], record["task"], query, int(record["batch"]), record.get("rate"),
        started=started, last_id=last_id, counts=counts,
    )  # fmt: skip
    return _execute(db, store, app, app.settings, job, counts["published"] + left, spec, out)


def _execute(
    db: Database, store: BackfillStore, app: Changeflow, settings: Settings, job: Job, total: int,
    app_spec: str | None, out: Any,
) -> int:  # fmt: skip
    """Run the job with signal handling; record how it ended; the exit code."""
    from pymongo.errors import PyMongoError

    from changeflow.backfill import runner
    from changeflow.backfill.progress import Progress, ProgressPrinter
    from changeflow.backfill.store import DONE, INTERRUPTED, TakenOver
    from changeflow.listener.backpressure import Backpressure, BrokerQueueLength
    from changeflow.listener.publish import make_publisher, task_queues

    publisher = make_publisher(settings, app)
    check = getattr(publisher, "check", None)
    if check is not None:
        check()
    backpressure, queue_length = None, None
    if settings.listener_max_queue_length:
        queue_length = BrokerQueueLength(app, task_queues(app, [job.task]))
        backpressure = Backpressure(queue_length, settings.listener_max_queue_length)
    stop = threading.Event()
    hint = resume_command(job.backfill_id, app_spec)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        print(
            f"\n{signal.Signals(signum).name}: stopping after the events being sent; the position of "
            "the last published batch is kept (again to abort at once)",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    progress = Progress(total=total, done=job.counts["published"] + job.counts["dead_lettered"])
    printer = ProgressPrinter(job.backfill_id)
    try:
        outcome = runner.run(
            db, publisher, store, job,
            stop=stop, progress=progress, printer=printer, backpressure=backpressure,
        )  # fmt: skip
    except KeyboardInterrupt:
        outcome = runner.Outcome(False, job.last_id, job.started)
    except TakenOver as exc:
        print(f"error: {exc}; this process stops", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PyMongoError as exc:
        error = f"{type(exc).__name__}: {mongo_error(exc)}"
        _record_end(store, job, INTERRUPTED, error)
        print(f"backfill {job.backfill_id} stopped, MongoDB unavailable ({error}); resume: {hint}", file=out)
        return EXIT_UNAVAILABLE
    except Exception:
        error = _scrub(traceback.format_exc())
        log.critical("backfill %s crashed:\n%s", job.backfill_id, error)
        _record_end(store, job, INTERRUPTED, error.strip().splitlines()[-1])
        print(f"backfill {job.backfill_id} crashed; resume with: {hint}", file=out)
        return EXIT_CRASH
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if queue_length is not None:
            queue_length.close()
    counts = job.counts
    if outcome.finished:
        _record_end(store, job, DONE, None)
        print(
            f"backfill {job.backfill_id} done: {counts['published']} events published, "
            f"{counts['dead_lettered']} dead-lettered",
            file=out,
        )
        return EXIT_OK
    _record_end(store, job, INTERRUPTED, None)
    where = f"after _id {position_text({'started': job.started, 'last_id': job.last_id})}"
    print(
        f"backfill {job.backfill_id} interrupted: {counts['published']} of {total} events published "
        f"({where}); resume with: {hint}",
        file=out,
    )
    return EXIT_INTERRUPTED


def _record_end(store: BackfillStore, job: Job, state: str, error: str | None) -> None:
    from changeflow.backfill.store import TakenOver

    try:
        store.finish(job.backfill_id, state, job.counts, error)
    except TakenOver:
        pass
    except Exception as exc:  # MongoDB gone too: the record says "running"; `list` tells it was killed
        log.warning("could not record the end of backfill %s: %s", job.backfill_id, _scrub(str(exc)))
