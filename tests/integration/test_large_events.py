"""A change event over 16 MB through the real processes: `python -m listener`, a celery worker, Redis,
the SMTP sink and MongoDB (the test server, or MONGODB_URI).

A 10 MB order is updated with 5 MB more and a new status: its update event (post-image 15 MB plus
the 5 MB updateDescription) is over 16 MB, so MongoDB sends it as two fragments. The listener must
publish it once, whole, move its checkpoint past it, and not publish it again after a restart.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from bson import ObjectId

from changeflow.listener.fragments import SPLIT_STAGE
from changeflow.listener.routes import compile_match
from harness.pipeline import LocalPipeline, wait_until
from tests.integration.large_event_summary import SEEN, digest
from worker import app as repo_app

ROUTES = repo_app.routes  # this repository's app (tasks/): the card's routes

pytestmark = pytest.mark.e2e

MB = 1024 * 1024
UPDATE_TASKS = ["tasks.append_event", "tasks.send_shipping_notification", "tasks.update_analytics"]
SUMMARY = re.compile(r"stream changeflow: (\d+) events seen, (\d+) tasks published")


def test_a_split_event_runs_its_tasks_once_with_the_whole_event() -> None:
    user = {"_id": ObjectId(), "email": "large@example.test", "name": "Large Order"}
    order = {
        "_id": ObjectId(),
        "user_id": user["_id"],
        "status": "pending",
        "total": 12,
        "big": "a" * (10 * MB),
    }
    more = "b" * (5 * MB)
    with LocalPipeline(workers=1, worker_app="tests.integration.large_event_worker") as pipeline:
        assert pipeline.sink is not None and pipeline.listener is not None
        db = pipeline.db
        db.users.insert_one(user)
        db.orders.insert_one(order)
        # The same stream as the listener's, to learn the fragments' tokens.
        stages = [{"$match": compile_match(ROUTES)}, SPLIT_STAGE]
        with db.watch(stages, full_document="updateLookup", max_await_time_ms=500) as stream:
            db.orders.update_one({"_id": order["_id"]}, {"$set": {"status": "shipped", "more": more}})
            fragments: list[dict[str, Any]] = []
            deadline = time.monotonic() + 60
            while len(fragments) < 2 and time.monotonic() < deadline:
                document = stream.try_next()
                if document is not None and "splitEvent" in document:
                    fragments.append(document)
        assert [f["splitEvent"] for f in fragments] == [{"fragment": 1, "of": 2}, {"fragment": 2, "of": 2}]

        def update_tasks_ran() -> bool:
            return (
                db[SEEN].count_documents({"operationType": "update"}) >= 2
                and len(pipeline.sink.messages) >= 1
            )

        assert wait_until(update_tasks_ran, timeout=120), pipeline.logs()

        def checkpoint_past_the_event() -> bool:
            saved = db.changeflow_checkpoints.find_one({"_id": "changeflow"}) or {}
            data = (saved.get("resume_token") or {}).get("_data", "")
            return data >= fragments[-1]["_id"]["_data"]

        assert wait_until(checkpoint_past_the_event, timeout=30), pipeline.logs()

        # A restart resumes after the event: only the next write is read.
        pipeline.listener.stop()
        first_run = pipeline.listener.log_text()
        pipeline.start_listener()
        marker = {"_id": ObjectId(), "user_id": user["_id"], "status": "pending", "total": 1}
        db.orders.insert_one(marker)
        assert wait_until(
            lambda: db[SEEN].count_documents({"fullDocument._id": marker["_id"]}) >= 1, timeout=60
        ), pipeline.logs()
        assert pipeline.listener.stop() == 0
        second_run = pipeline.listener.log_text()
        seen = list(db[SEEN].find({"operationType": "update"}))
        emails = list(pipeline.sink.messages)
        dead_letters = list(db.changeflow_dead_letters.find())

    assert "are reassembled" in first_run
    # The marker's insert only: its analytics count and its event_store entry.
    assert SUMMARY.findall(second_run)[-1] == ("1", "2"), second_run
    assert "Traceback" not in first_run + second_run
    # Each task of the update ran once, with the whole event as stored, keyed by the first fragment.
    assert sorted(s["task"] for s in seen) == UPDATE_TASKS
    for record in seen:
        assert record["event_id"] == fragments[0]["_id"]
        assert {"fullDocument", "updateDescription", "documentKey", "ns", "clusterTime"} <= set(
            record["fields"]
        )
        assert "splitEvent" not in record["fields"]
        assert record["fullDocument"]["big"] == digest(order["big"])
        assert record["fullDocument"]["more"] == digest(more)
        assert record["fullDocument"]["status"] == "shipped"
        assert record["updatedFields"] == {"status": "shipped", "more": digest(more)}
    shipping = [m for m in emails if "shipped" in str(m["Subject"])]
    assert len(shipping) == 1 and len(emails) == 2  # and the user's welcome email
    assert dead_letters == []
