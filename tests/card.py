"""The card's four side effects (issue 1): engine tests that count messages per event use their routes.

This repository's app has more effects since (the seed guide's catalogue, tasks/event_log.py,
tasks/event_store.py, tasks/cache.py); a publisher test about chunking or encoding wants a fixed
number of tasks per event, not whatever the app declares today.
"""

from __future__ import annotations

from changeflow.listener.routes import Route

CARD_TASKS = frozenset(
    {
        "tasks.send_welcome_email",
        "tasks.create_profile",
        "tasks.send_shipping_notification",
        "tasks.update_analytics",
    }
)


def card_routes() -> tuple[Route, ...]:
    """This repository's app's routes to the card's four tasks (two per users insert)."""
    from worker import app

    return tuple(route for route in app.routes if set(route.tasks) <= CARD_TASKS)


def user_insert_tasks() -> list[str]:
    """The tasks this repository's app sends for a users insert, in route order (the whole app)."""
    from changeflow.listener.routes import tasks_for
    from worker import app

    event = {"operationType": "insert", "ns": {"db": "app", "coll": "users"}, "fullDocument": {"_id": 1}}
    return tasks_for(event, app.routes)
