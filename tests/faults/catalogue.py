"""The catalogue's effects under faults: one event_log entry per user, one event_store entry per change.

Both are written so that a redelivery cannot double them (a unique (type, user_id), `_id` = the
change's resume token); these checks count what is there after the broker drained, per document,
against the writes the scenario made.
"""

from __future__ import annotations

from collections import Counter

from pymongo.database import Database

from harness.workload import Workload
from tests.faults.result import Result


def expected_changes(work: Workload) -> Counter[object]:
    """Change events per document: a user's insert; an order's insert and each status change."""
    changes: Counter[object] = Counter({user["_id"]: 1 for user in work.users})
    changes.update(order["_id"] for order in work.orders)
    changes.update(order_id for order_id, _ in work.transitions)
    return changes


def check_catalogue(db: Database, result: Result, work: Workload) -> None:
    """event_log: one entry per user; event_store: one entry per change, each eventId once."""
    logged = Counter(entry["user_id"] for entry in db.event_log.find({"type": "user_registered"}))
    users = Counter({user["_id"]: 1 for user in work.users})
    doubled_log = sorted(str(k) for k, n in logged.items() if n > 1)
    missing_log = sorted(str(k) for k in users if k not in logged)
    result.check(
        "event_log: exactly one user_registered entry per user",
        logged == users,
        f"{sum(logged.values())} entries for {len(users)} users; doubled {doubled_log[:5]}, missing "
        f"{missing_log[:5]}",
    )
    entries = list(db.event_store.find({}, {"aggregateId": 1, "eventId": 1}))
    stored = Counter(entry["aggregateId"] for entry in entries)
    want = expected_changes(work)
    off = sorted(f"{k}: {stored.get(k, 0)} of {n}" for k, n in want.items() if stored.get(k, 0) != n)
    result.check(
        "event_store: exactly one entry per change (per document, as written)",
        stored == want,
        f"{len(entries)} entries for {sum(want.values())} changes; {off[:5]}",
    )
    event_ids = Counter(entry["eventId"] for entry in entries)
    result.check(
        "event_store: each eventId once",
        all(n == 1 for n in event_ids.values()),
        f"repeated: {[k for k, n in event_ids.items() if n > 1][:5]}",
    )
    result.notes.append(
        f"catalogue: {sum(logged.values())} event_log entries for {len(users)} users, {len(entries)} "
        f"event_store entries for {sum(want.values())} changes"
    )
