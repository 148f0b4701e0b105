"""This repository's app with two test-only additions, for tests/e2e/test_backfill.py
(`celery -A tests.e2e.backfill_app worker`, `changeflow backfill -A tests.e2e.backfill_app ...`):

- every run of `tasks.create_profile`'s body is counted in `task_runs` (`{_id: "create_profile:<user
  _id>", runs}`): profiles are unique by _id whatever happens, the count shows a body that ran twice;
- `backfill_test.user_card`, on users inserts and updates, copies the user's name as the event shows
  it into `user_cards` (an effect that depends on the document's content: a stale event overwrites
  a newer name), and counts its runs in `task_runs` too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from changeflow.worker.errors import Skip
from changeflow.worker.mongo import get_db
from worker import app  # this repository's app, its modules discovered


def _count_runs(task_name: str, prefix: str) -> None:
    task = app.tasks[task_name]
    body: Callable[..., Any] = task.run

    @wraps(body)
    def run(event: dict[str, Any]) -> Any:
        user_id = event["documentKey"]["_id"]
        get_db().task_runs.update_one({"_id": f"{prefix}:{user_id}"}, {"$inc": {"runs": 1}}, upsert=True)
        return body(event)

    # IdempotentTask._run_once calls self.run(...): an instance attribute shadows the class's body.
    task.run = run


_count_runs("tasks.create_profile", "create_profile")


@app.on("users", ["insert", "update"], name="backfill_test.user_card")
def user_card(event: dict[str, Any]) -> None:
    user = event.get("fullDocument")
    if not isinstance(user, dict):
        raise Skip("no document")
    db = get_db()
    db.user_cards.update_one({"_id": user["_id"]}, {"$set": {"name": user.get("name")}}, upsert=True)
    db.task_runs.update_one({"_id": f"user_card:{user['_id']}"}, {"$inc": {"runs": 1}}, upsert=True)


__all__ = ["app"]
