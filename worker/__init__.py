"""changeflow's worker side: the dedup guard, Celery configuration, and the contract the listener shares.

`celery -A worker worker` (and `python -m listener` without -A) run this repository's own app,
tasks/app.py, found here as `worker.app`. It is looked up on first use, not at import: importing
`worker` (as changeflow itself does) must not create an app or read the environment.
"""

from __future__ import annotations

from typing import Any

# The submodule worker/app.py (Celery configuration) is loaded now and its name unbound, so that
# `worker.app` always means the app below: Python binds a submodule to its package's attribute only
# when it first loads it.
import worker.app  # noqa: F401

del app  # noqa: F821  (bound by the import above)


def __getattr__(name: str) -> Any:
    if name == "app":  # what `celery -A worker` looks up
        from tasks.app import app

        app.discover()  # its modules declare the tasks and routes (cheap once imported)
        globals()["app"] = app
        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
