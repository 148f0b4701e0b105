"""Running the worker side in-process against servers of a test's own, without leaking settings.

    with configured(CELERY_BROKER_URL=redis.url, MONGODB_URI=uri, MONGODB_DB=db.name, SMTP_PORT="2525"):
        tasks.email.send_welcome_email.apply(args=[event], task_id=key)

Settings come from the environment (changeflow.worker.settings.get_settings), so this sets the variables,
clears get_settings' cache and reconfigures the app (`app=`; default: this checkout's `worker.app`,
tasks/app.py, importable only from the checkout); on exit it restores all three.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from changeflow.worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from changeflow.app import Changeflow


@contextmanager
def configured(*, app: Changeflow | None = None, **env: str) -> Iterator[Settings]:
    if app is None:
        from worker import app  # this checkout's app: tests of this repository
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        yield app.configure()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()
        app.configure()
