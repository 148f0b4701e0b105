"""Gaps in the change stream: the stretches of history the listener could not read.

When the checkpoint is no longer in the oplog (ChangeStreamHistoryLost, 286), the changes between
the checkpoint and the moment the listener starts again were never published. The listener records
such a gap in `changeflow_gaps` (in MONGODB_DB) before it exits or resumes from now:

    {_id: "<stream>-<10 hex>",                 # derived from stream + from.token: one record per gap
     stream,
     from: {token, time},                      # the checkpoint (last delivered position) and its time
     to: {time, token,                         # where the listener started again (token null until
                                               # a listener resumed with --on-history-lost=resume-now)
          delivered: [{coll, id}]},            # inserts created inside the window that the resumed
                                               # stream delivered (late writes): reconcile skips them
     detected_at, last_detected_at, detections, # detections: how many starts hit this gap
     resolved: false, resolution: null}         # set by `python -m listener reconcile --gap ID`

`python -m listener gaps` lists them; `reconcile --gap ID` re-emits what can be recovered.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.database import Database

COLLECTION = "changeflow_gaps"
# Inserts delivered after a resume are noted only if created this close to the gap's end: late writes
# in flight at the resume. Older creation times (a restore of old documents, say) would only grow the
# record; reconcile's oplog check covers the last two seconds anyway.
LATE_WRITE_SECONDS = 60


def as_utc(value: datetime) -> datetime:
    """BSON dates come back naive (UTC) unless the client is tz-aware."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def gap_id(stream: str, from_token: Mapping[str, Any] | None) -> str:
    data = str((from_token or {}).get("_data", ""))
    digest = hashlib.sha1((stream + "\n" + data).encode()).hexdigest()[:10]
    return f"{stream}-{digest}"


@dataclass(frozen=True)
class GapEnd:
    """A resumed gap whose window late inserts can still fall into."""

    identifier: str
    since: datetime
    until: datetime


def creation_times(document: Mapping[str, Any], changed_at: Iterable[str]) -> list[datetime]:
    """When `document` was created, as reconcile tells it: its ObjectId `_id`, its `changed_at` fields."""
    from bson import ObjectId

    times = []
    if isinstance(document.get("_id"), ObjectId):
        times.append(document["_id"].generation_time)
    for name in changed_at:
        value = document.get(name)
        if isinstance(value, datetime):
            times.append(as_utc(value))
    return times


def in_window(when: datetime, since: datetime, until: datetime) -> bool:
    """Whether a creation time falls in reconcile's window: ObjectIds hold whole seconds, so the
    window's first and last seconds count entirely."""
    return since.replace(microsecond=0) <= when < until.replace(microsecond=0) + timedelta(seconds=1)


def late_inserts(
    events: Iterable[Mapping[str, Any]],
    ends: Sequence[GapEnd],
    insert_routes: Mapping[str, Sequence[str]],
) -> dict[str, list[dict[str, Any]]]:
    """Per gap, the insert events among `events` whose document was created inside its window, at
    most LATE_WRITE_SECONDS before its end.

    `insert_routes`: the collections with insert routes, each with its routes' `changed_at` fields.
    The resumed stream delivered these: an application wrote them a little late (or its clock is
    behind), so their creation time says "inside the gap" although their event was not lost.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    if not ends:
        return found
    for event in events:
        coll = (event.get("ns") or {}).get("coll")
        if event.get("operationType") != "insert" or coll not in insert_routes:
            continue
        document = dict(event.get("fullDocument") or {})
        document["_id"] = (event.get("documentKey") or {}).get("_id")
        times = creation_times(document, insert_routes[coll])
        for end in ends:
            since = max(end.since, end.until - timedelta(seconds=LATE_WRITE_SECONDS))
            if any(in_window(when, since, end.until) for when in times):
                found.setdefault(end.identifier, []).append({"coll": coll, "id": document["_id"]})
    return found


class GapStore:
    def __init__(self, db: Database, collection: str = COLLECTION) -> None:
        self.collection = db[collection]

    def record(
        self,
        stream: str,
        from_token: Mapping[str, Any] | None,
        from_time: datetime | None,
        to_time: datetime,
        time_source: str = "position_time",
    ) -> str:
        """Record (or count again) the gap that starts at `from_token`; returns its id."""
        identifier = gap_id(stream, from_token)
        now = datetime.now(UTC)
        self.collection.update_one(
            {"_id": identifier},
            {
                "$setOnInsert": {
                    "stream": stream,
                    "from": {
                        "token": dict(from_token) if from_token else None,
                        "time": from_time,
                        "time_source": time_source,
                    },
                    "detected_at": now,
                    "resolved": False,
                    "resolution": None,
                    "to": {"time": to_time, "token": None},
                },
                "$set": {"last_detected_at": now},
                "$inc": {"detections": 1},
            },
            upsert=True,
        )
        # Until a listener resumed, the gap grows: its end is the latest detection.
        self.collection.update_one(
            {"_id": identifier, "to.token": None}, {"$set": {"to": {"time": to_time, "token": None}}}
        )
        return identifier

    def resumed(self, identifier: str, time: datetime, token: Mapping[str, Any] | None) -> None:
        """The listener started again at `token` (server time `time`): the gap's end is known."""
        self.collection.update_one(
            {"_id": identifier}, {"$set": {"to": {"time": time, "token": dict(token) if token else None}}}
        )

    def ends(self, stream: str) -> list[GapEnd]:
        """The unresolved gaps of `stream` that a listener resumed after (their window is known)."""
        ends = []
        for gap in self.collection.find({"stream": stream, "resolved": False, "to.token": {"$ne": None}}):
            since, until = (gap.get("from") or {}).get("time"), gap["to"].get("time")
            if isinstance(since, datetime) and isinstance(until, datetime):
                ends.append(GapEnd(gap["_id"], as_utc(since), as_utc(until)))
        return ends

    def delivered(self, identifier: str, inserts: Sequence[Mapping[str, Any]]) -> None:
        """Note inserts created inside the gap's window that the resumed stream delivered."""
        self.collection.update_one(
            {"_id": identifier}, {"$addToSet": {"to.delivered": {"$each": [dict(each) for each in inserts]}}}
        )

    def get(self, identifier: str) -> dict[str, Any] | None:
        return self.collection.find_one({"_id": identifier})

    def list(self, include_resolved: bool = False) -> list[dict[str, Any]]:
        query: dict[str, Any] = {} if include_resolved else {"resolved": False}
        return list(self.collection.find(query).sort([("detected_at", 1), ("_id", 1)]))

    def resolve(self, identifier: str, resolution: Mapping[str, Any]) -> None:
        self.collection.update_one(
            {"_id": identifier}, {"$set": {"resolved": True, "resolution": dict(resolution)}}
        )


def main(argv: Sequence[str] | None = None, out: Any = sys.stdout) -> int:
    """`python -m listener gaps [--all]`: one line per gap; exit 0, 1 MongoDB unavailable, 2 usage."""
    parser = argparse.ArgumentParser(
        prog="python -m listener gaps",
        description=f"List recorded gaps of lost change stream history ({COLLECTION} in MONGODB_DB).",
    )
    parser.add_argument("--all", action="store_true", help="also resolved gaps")
    args = parser.parse_args(argv)
    try:
        import pymongo
        from pymongo.errors import ConfigurationError, PyMongoError

        from changeflow.worker.settings import Settings

        settings = Settings.from_env()
        client: pymongo.MongoClient = pymongo.MongoClient(
            settings.mongodb_uri, serverSelectionTimeoutMS=5_000
        )
    except (ValueError, ConfigurationError) as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    try:
        for gap in GapStore(client[settings.mongodb_db]).list(include_resolved=args.all):
            start, end = gap.get("from") or {}, gap.get("to") or {}
            state = "resolved" if gap.get("resolved") else "OPEN"
            print(
                f"{gap['_id']}  {state}  stream={gap.get('stream')}  from={_iso(start.get('time'))}  "
                f"to={_iso(end.get('time'))}{'' if end.get('token') else ' (not resumed yet)'}  "
                f"detections={gap.get('detections')}",
                file=out,
            )
        return 0
    except PyMongoError as exc:
        print(f"MongoDB unavailable: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _iso(value: Any) -> str:
    if not isinstance(value, datetime):
        return "?"
    return as_utc(value).isoformat()
