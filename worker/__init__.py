"""This deployment's workers: `celery -A worker worker` runs this repository's app, tasks/app.py.

`worker.app` is looked up on first use, not at import: importing `worker` creates no app and reads no
environment. The worker side itself is `changeflow.worker` (installed with changeflow); this folder
and tasks/ beside it are the checkout's, not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# The checkout's root, where tasks/ lives beside this folder. `celery -A worker` puts the working
# directory on sys.path only while it imports this module, not while it looks up `app` in it.
CHECKOUT = str(Path(__file__).resolve().parent.parent)


def __getattr__(name: str) -> Any:
    if name == "app":  # what `celery -A worker` looks up
        if CHECKOUT not in sys.path:
            sys.path.insert(0, CHECKOUT)
        from tasks.app import app

        app.discover()  # its modules declare the tasks and routes (cheap once imported)
        globals()["app"] = app
        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
