"""Gaps in the change stream: the stretches of history the listener could not read.

When the checkpoint is no longer in the oplog (ChangeStreamHistoryLost, 286), the changes between
the checkpoint and the moment the listener starts again were never published. The listener records
such a gap in `changeflow_gaps` (in MONGODB_DB) before it exits or resumes from now:

    {_id: "<stream>-<10 hex>",                 # derived from stream + from.token: one record per gap
     stream,
     from: {token, time},                      # the checkpoint (last delivered position) and its time
     to: {time, token},                        # where the listener started again (token null until
                                               # a listener resumed with --on-history-lost=resume-now)
     detected_at, last_detected_at, detections, # detections: how many starts hit this gap
     resolved: false, resolution: null}         # set by `python -m listener reconcile --gap ID`

`python -m listener gaps` lists them; `reconcile --gap ID` re-emits what can be recovered.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo.database import Database

COLLECTION = "changeflow_gaps"


def gap_id(stream: str, from_token: Mapping[str, Any] | None) -> str:
    data = str((from_token or {}).get("_data", ""))
    digest = hashlib.sha1((stream + "\n" + data).encode()).hexdigest()[:10]
    return f"{stream}-{digest}"


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
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
