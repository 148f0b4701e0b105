"""record_dead_letter: the worker's (permanent, retries_exhausted) and the listener's (unpublishable)."""

from __future__ import annotations

import time

import pytest
from bson.regex import Regex
from pymongo.database import Database

from changeflow.worker.dead_letters import COLLECTION, record_dead_letter

PAYLOAD = {"_id": {"_data": "82AB"}, "operationType": "insert", "fullDocument": {"_id": 1, "re": Regex("^a")}}


def record(db: Database, **overrides: object) -> None:
    fields: dict = {
        "task_name": "tasks.send_welcome_email",
        "task_id": "key-1",
        "payload": PAYLOAD,
        "error": "EncodeError: cannot serialize bson.regex.Regex at fullDocument.re",
        "traceback": "\n".join(f"line {i}" for i in range(50)),
        "attempts": 1,
        "reason": "unpublishable",
    } | overrides
    record_dead_letter(db, **fields)


def test_a_dead_letter_keeps_the_event_and_why(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    record(db)
    [letter] = list(db[COLLECTION].find())
    assert letter["_id"] == letter["task_id"] == "key-1"
    assert letter["task"] == "tasks.send_welcome_email"
    assert letter["event_id"] == PAYLOAD["_id"]
    assert letter["payload"]["fullDocument"]["re"].pattern == "^a"  # BSON types stored as they are
    assert letter["reason"] == "unpublishable"
    assert letter["traceback"].splitlines() == [f"line {i}" for i in range(30, 50)]  # the last 20 lines
    assert letter["first_failed_at"] == letter["last_failed_at"]
    assert any(r.levelname == "ERROR" and "key-1" in r.getMessage() for r in caplog.records)


def test_a_repeat_updates_the_same_dead_letter(db: Database) -> None:
    record(db, reason="retries_exhausted", attempts=3, traceback=None)
    time.sleep(0.01)
    record(db, reason="retries_exhausted", attempts=6, error="later error", traceback=None)
    [letter] = list(db[COLLECTION].find())
    assert (letter["attempts"], letter["error"], letter["traceback"]) == (6, "later error", None)
    assert letter["last_failed_at"] > letter["first_failed_at"]


def test_unknown_reason_is_refused(db: Database) -> None:
    with pytest.raises(ValueError, match="unknown dead-letter reason"):
        record(db, reason="oops")
    assert db[COLLECTION].count_documents({}) == 0
