"""This deployment's workers: `celery -A worker worker` runs this repository's app, tasks/app.py.

`worker.app` is looked up on first use, not at import: importing `worker` creates no app and reads no
environment. The worker side itself is `changeflow.worker` (installed with changeflow); this folder
is the checkout's, not installed.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":  # what `celery -A worker` looks up
        from tasks.app import app

        app.discover()  # its modules declare the tasks and routes (cheap once imported)
        globals()["app"] = app
        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
