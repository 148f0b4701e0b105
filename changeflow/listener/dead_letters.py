"""`python -m listener dead-letters list|show|replay|purge`: look at dead letters and send them again.

A dead letter (`changeflow_dead_letters`, written by `changeflow.worker.dead_letters.record_dead_letter`) is a
task changeflow gave up on. Replaying one publishes its task again with the SAME task id (the dedup
key) and its stored payload, through the listener's publisher. The workers' dedup guard therefore
runs it only if the key is not *done* yet: replaying an effect that already happened does nothing
(the worker logs `duplicate <task> <key>`), a replay after fixing the cause runs it.

`--refresh` re-reads the event's document (`documentKey._id` in `ns.db`/`ns.coll`) into
`payload.fullDocument` first: needed when the task takes its data from the payload (the welcome
email) and the document was fixed afterwards, and the only way to replay an `unpublishable` letter
(its stored payload holds repr() strings in place of the values the serializer refused) or an
`undecodable` one (its payload is what could be read of a message the worker could not decode).

Exit codes: 0 done (every selected letter replayed, or skipped for a stated reason), 1 the broker or
MongoDB was unavailable (the letters not published are left as they were), 2 usage: bad flags or
settings, or an ID that is not a dead letter (nothing is done then).

Worker modules are imported inside main(): `--help` works without a broker or valid settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pymongo
from pymongo.errors import ConfigurationError, PyMongoError

if TYPE_CHECKING:
    from pymongo.collection import Collection
    from pymongo.database import Database

    from changeflow.app import Changeflow
    from changeflow.listener.publish import Publisher

EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2

COLLECTION = "changeflow_dead_letters"  # = worker.dead_letters.COLLECTION (not imported: see above)
REASONS = ("permanent", "retries_exhausted", "unpublishable", "undecodable")
ERROR_WIDTH = 70  # the error column of the table, in characters
SERVER_SELECTION_TIMEOUT_MS = 5_000

log = logging.getLogger("listener.dead_letters")


class UsageError(Exception):
    """A request that cannot be carried out as asked (exit 2, nothing done)."""


# -- the command line ---------------------------------------------------------------------------


def _timestamp(text: str) -> datetime:
    """An ISO 8601 date or date-time; without a zone it is UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 date or date-time: {text!r} (e.g. 2026-11-23 or 2026-11-23T18:00:00Z)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task", metavar="NAME", help="only letters of this task, e.g. tasks.send_welcome_email"
    )
    parser.add_argument("--reason", choices=REASONS, help="only letters failed for this reason")
    parser.add_argument(
        "--since",
        type=_timestamp,
        metavar="ISO",
        help="only letters that last failed at or after this time (UTC)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m listener dead-letters",
        description="List, show, replay and purge dead letters (changeflow_dead_letters in MONGODB_DB). "
        "Settings come from the environment: MONGODB_URI, MONGODB_DB, CELERY_BROKER_URL.",
        epilog="exit codes: 0 done (replayed or skipped for a stated reason), 1 broker or MongoDB "
        "unavailable, 2 usage (bad flags or settings, unknown ID)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="a table of dead letters, newest failure first")
    _add_filters(listing)
    listing.add_argument("--limit", type=_positive, metavar="N", help="at most N letters")
    listing.add_argument(
        "--json", action="store_true", help="one JSON document per line (relaxed Extended JSON)"
    )

    show = commands.add_parser("show", help="one dead letter, every field")
    show.add_argument("id", metavar="ID", help="the letter's _id (= the task id, the dedup key)")
    show.add_argument("--json", action="store_true", help="a single JSON document (relaxed Extended JSON)")

    replay = commands.add_parser(
        "replay",
        help="publish letters' tasks again, same task id and payload",
        description="Publish each selected letter's task again with the same task id (the dedup key) and "
        "its stored payload. A key already done does nothing at the worker.",
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="letters to replay")
    _add_filters(replay)
    replay.add_argument("--all", action="store_true", help="every dead letter")
    replay.add_argument(
        "--refresh",
        action="store_true",
        help="re-read the current document (documentKey._id) into payload.fullDocument before publishing",
    )
    replay.add_argument("--dry-run", action="store_true", help="say what would be replayed; publish nothing")

    purge = commands.add_parser("purge", help="delete dead letters")
    purge.add_argument("ids", nargs="*", metavar="ID", help="letters to delete")
    purge.add_argument("--all", action="store_true", help="every dead letter (needs --yes)")
    purge.add_argument("--yes", action="store_true", help="confirm --all")
    return parser


def _check_selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "replay":
        filters = [f"--{name}" for name in ("task", "reason", "since") if getattr(args, name) is not None]
        chosen = sum([bool(args.ids), bool(filters), args.all])
        if chosen != 1:
            parser.error(
                "replay: give IDs, or filters (--task/--reason/--since), or --all: exactly one of them"
            )
    elif args.command == "purge":
        if bool(args.ids) == args.all:
            parser.error("purge: give IDs, or --all --yes")
        if args.all and not args.yes:
            parser.error("purge --all deletes every dead letter: add --yes to confirm")


# -- reading letters -----------------------------------------------------------------------------


def letter_filter(
    *, task: str | None = None, reason: str | None = None, since: datetime | None = None
) -> dict[str, Any]:
    query: dict[str, Any] = {}
    if task is not None:
        query["task"] = task
    if reason is not None:
        query["reason"] = reason
    if since is not None:
        query["last_failed_at"] = {"$gte": since}
    return query


def find_letters(collection: Collection, query: Mapping[str, Any], limit: int | None = None) -> list[dict]:
    """Letters matching `query`, the latest failure first."""
    cursor = collection.find(dict(query)).sort([("last_failed_at", -1), ("_id", 1)])
    if limit:
        cursor = cursor.limit(limit)
    return list(cursor)


def letters_by_id(collection: Collection, ids: Sequence[str]) -> list[dict]:
    """The letters with these ids, in the order given; UsageError naming any that do not exist."""
    wanted = list(dict.fromkeys(ids))
    found = {letter["_id"]: letter for letter in collection.find({"_id": {"$in": wanted}})}
    missing = [key for key in wanted if key not in found]
    if missing:
        raise UsageError(f"no dead letter with id {', '.join(missing)}")
    return [found[key] for key in wanted]


# -- formatting ----------------------------------------------------------------------------------


def _when(value: object) -> str:
    if not isinstance(value, datetime):
        return "" if value is None else str(value)
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)  # pymongo's naive datetimes are UTC
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _first_line(text: object, width: int = ERROR_WIDTH) -> str:
    lines = str(text or "").strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def to_json(document: Mapping[str, Any], indent: int | None = None) -> str:
    from bson import json_util

    return json_util.dumps(document, json_options=json_util.RELAXED_JSON_OPTIONS, indent=indent)


def table(letters: Sequence[Mapping[str, Any]]) -> str:
    """id, task, reason, attempts, last failure, replays, the error's first line: aligned columns."""
    header = ("ID", "TASK", "REASON", "ATTEMPTS", "LAST_FAILED_AT", "REPLAYS", "ERROR")
    rows = [
        (
            str(letter["_id"]),
            str(letter.get("task", "")),
            str(letter.get("reason", "")),
            str(letter.get("attempts", "")),
            _when(letter.get("last_failed_at")),
            str(letter.get("replay_count", 0)),
            _first_line(letter.get("error")),
        )
        for letter in letters
    ]
    # Every column but the last (the error) padded to its widest cell.
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def describe(letter: Mapping[str, Any]) -> str:
    """A dead letter for a human: its fields as JSON, then the traceback as it was printed."""
    fields = {key: value for key, value in letter.items() if key != "traceback"}
    text = to_json(fields, indent=2)
    if letter.get("traceback"):
        text += "\ntraceback (last lines):\n" + str(letter["traceback"])
    return text


# -- replaying -----------------------------------------------------------------------------------


@dataclass
class ReplayReport:
    replayed: list[tuple[Mapping[str, Any], str]] = field(default_factory=list)  # (letter, note)
    skipped: list[tuple[Mapping[str, Any], str]] = field(default_factory=list)  # (letter, why)
    not_sent: list[Mapping[str, Any]] = field(default_factory=list)  # left when the broker went away
    unavailable: str | None = None

    def summary(self, dry_run: bool = False) -> str:
        verb = "would replay" if dry_run else "replayed"
        text = f"{verb} {len(self.replayed)}, skipped {len(self.skipped)}"
        if self.unavailable:
            text += f", not replayed {len(self.not_sent)} ({self.unavailable})"
        return text


class NotReplayable(Exception):
    """This letter cannot be replayed as it is; the message says why."""


def _document_key(payload: Mapping[str, Any]) -> tuple[str, str, Any]:
    ns = payload.get("ns")
    key = payload.get("documentKey")
    if not (isinstance(ns, Mapping) and ns.get("db") and ns.get("coll")):
        raise NotReplayable("--refresh: the payload has no ns (db, coll) to read the document from")
    if not (isinstance(key, Mapping) and "_id" in key):
        raise NotReplayable("--refresh: the payload has no documentKey._id to read the document by")
    return str(ns["db"]), str(ns["coll"]), key["_id"]


def refreshed(payload: Mapping[str, Any], db: Database) -> dict[str, Any]:
    """`payload` with fullDocument replaced by the document as it is now in MongoDB."""
    database, collection, key = _document_key(payload)
    document = db.client[database][collection].find_one({"_id": key})
    if document is None:
        raise NotReplayable(f"--refresh: {database}.{collection} has no document with _id {key!r} any more")
    return {**payload, "fullDocument": document}


def replay_payload(letter: Mapping[str, Any], db: Database, refresh: bool) -> dict[str, Any]:
    """The payload to publish for `letter`, or NotReplayable saying why it cannot be replayed."""
    payload = letter.get("payload")
    if not isinstance(payload, Mapping):
        raise NotReplayable("no stored payload")
    if "args" in payload and "_id" not in payload:
        raise NotReplayable("the task was called with other arguments than a change event; replay it by hand")
    if refresh:
        return refreshed(payload, db)
    if letter.get("reason") == "unpublishable":
        raise NotReplayable(
            "unpublishable: the stored payload holds repr() strings for the values the serializer "
            "refused; fix the document, then replay with --refresh"
        )
    if letter.get("reason") == "undecodable":
        raise NotReplayable(
            "undecodable: the stored payload is what could be read of a message the worker could not "
            "decode; replay with --refresh"
        )
    return dict(payload)


def _encode_error(payload: Mapping[str, Any]) -> str | None:
    """Why the task serializer refuses `payload`, or None when it can be sent."""
    from kombu.serialization import dumps

    from changeflow.listener.publish import ENCODE_ERRORS

    try:
        dumps([payload], serializer="json")
    except ENCODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def replay(
    letters: Iterable[Mapping[str, Any]],
    db: Database,
    publisher: Publisher,
    *,
    refresh: bool = False,
    dry_run: bool = False,
    now: datetime | None = None,
) -> ReplayReport:
    """Publish each letter's task (same task id, stored or refreshed payload); mark the ones sent.

    After the first broker error nothing more is published: the letters that would have been are
    reported as not sent (none of them is marked); the others are still reported as skipped and why.
    """
    from changeflow.listener.publish import BROKER_ERRORS, BrokerUnavailable, Message

    report = ReplayReport()
    note = "refreshed" if refresh else ""
    for letter in letters:
        try:
            payload = replay_payload(letter, db, refresh)
            error = _encode_error(payload)
            if error:
                raise NotReplayable(f"the payload cannot be serialized: {error}")
        except NotReplayable as skip:
            report.skipped.append((letter, str(skip)))
            continue
        if dry_run:
            report.replayed.append((letter, note))
            continue
        if report.unavailable:
            report.not_sent.append(letter)
            continue
        try:
            rejected = publisher.publish([Message(str(letter["task"]), str(letter["_id"]), payload)])
        except (BrokerUnavailable, *BROKER_ERRORS) as exc:
            report.unavailable = (
                str(exc) if isinstance(exc, BrokerUnavailable) else f"broker unavailable: {exc}"
            )
            report.not_sent.append(letter)
            continue
        if rejected:
            report.skipped.append((letter, f"the payload cannot be serialized: {rejected[0].error}"))
            continue
        db[COLLECTION].update_one(
            {"_id": letter["_id"]},
            {"$set": {"replayed_at": now or datetime.now(UTC)}, "$inc": {"replay_count": 1}},
        )
        report.replayed.append((letter, note))
    return report


def print_report(report: ReplayReport, dry_run: bool, out: Any) -> None:
    verb = "would replay" if dry_run else "replayed"
    for letter, note in report.replayed:
        suffix = f" ({note})" if note else ""
        print(f"{verb} {letter['_id']} {letter.get('task', '')}{suffix}", file=out)
    for letter, why in report.skipped:
        print(f"skipped {letter['_id']} {letter.get('task', '')}: {why}", file=out)
    for letter in report.not_sent:
        print(f"not replayed {letter['_id']} {letter.get('task', '')}: {report.unavailable}", file=out)
    print(report.summary(dry_run), file=out)


# -- the commands --------------------------------------------------------------------------------


def _list(args: argparse.Namespace, collection: Collection, out: Any) -> int:
    letters = find_letters(
        collection, letter_filter(task=args.task, reason=args.reason, since=args.since), args.limit
    )
    if args.json:
        for letter in letters:
            print(to_json(letter), file=out)
    elif letters:
        print(table(letters), file=out)
    else:
        print("no dead letters", file=out)
    return EXIT_OK


def _show(args: argparse.Namespace, collection: Collection, out: Any) -> int:
    [letter] = letters_by_id(collection, [args.id])
    print(to_json(letter, indent=2) if args.json else describe(letter), file=out)
    return EXIT_OK


def _replay(args: argparse.Namespace, db: Database, out: Any, app: Changeflow) -> int:
    from changeflow.listener.publish import make_publisher

    collection = db[COLLECTION]
    if args.ids:
        letters = letters_by_id(collection, args.ids)
    else:
        query = {} if args.all else letter_filter(task=args.task, reason=args.reason, since=args.since)
        letters = find_letters(collection, query)[::-1]  # the oldest failure first
    publisher = make_publisher(app.settings, app)
    report = replay(letters, db, publisher, refresh=args.refresh, dry_run=args.dry_run)
    print_report(report, args.dry_run, out)
    return EXIT_UNAVAILABLE if report.unavailable else EXIT_OK


def _purge(args: argparse.Namespace, collection: Collection, out: Any) -> int:
    if args.all:
        deleted = collection.delete_many({}).deleted_count
    else:
        ids = [letter["_id"] for letter in letters_by_id(collection, args.ids)]
        deleted = collection.delete_many({"_id": {"$in": ids}}).deleted_count
    print(f"purged {deleted} dead letter(s)", file=out)
    return EXIT_OK


def main(argv: Sequence[str] | None = None, *, app: str | None = None) -> int:
    """Run one dead-letters command for the changeflow app `app` names (-A; default CHANGEFLOW_APP,
    else `worker`); returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_selection(parser, args)
    except SystemExit as exc:  # --help (0) or a usage error (2): return the code, do not exit
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    out = sys.stdout
    try:
        # Loading the app reads the settings from the environment: a bad variable raises here.
        from changeflow.app import load_app
        from changeflow.worker.serialization import MONGO_CLIENT_OPTIONS

        changeflow_app = load_app(app)  # the Celery app a replay publishes through
        settings = changeflow_app.settings
        client: pymongo.MongoClient = pymongo.MongoClient(
            settings.mongodb_uri,
            appname="changeflow-dead-letters",
            serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
            **MONGO_CLIENT_OPTIONS,
        )
    except (ValueError, ConfigurationError) as exc:
        what = "app" if type(exc).__name__ == "AppError" else "settings"  # changeflow.app.AppError
        print(f"invalid {what}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    db = client[settings.mongodb_db]
    try:
        if args.command == "list":
            return _list(args, db[COLLECTION], out)
        if args.command == "show":
            return _show(args, db[COLLECTION], out)
        if args.command == "replay":
            return _replay(args, db, out, changeflow_app)
        return _purge(args, db[COLLECTION], out)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PyMongoError as exc:
        print(f"MongoDB unavailable: {_first_line(exc, 200)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
