"""changeflow: reliable side effects from MongoDB writes, declared in a team's own package.

    from changeflow import Changeflow, FieldChanged

    app = Changeflow("acme")

    @app.on("invoices", "insert")
    def send_invoice(event): ...

Importing this package configures nothing and reads no environment: settings are read when an app
is created. `celery -A acme.effects worker` and `changeflow listen -A acme.effects` run it.
The names below are imported on first use: importing a submodule (`changeflow.worker.settings`,
`changeflow.testing.mongo_double`) loads this package first, and it must stay light and cycle-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from changeflow.app import Changeflow
    from changeflow.listener.routes import FieldChanged
    from changeflow.worker.errors import PermanentTaskError, Skip
    from changeflow.worker.idempotent import current_key

__all__ = ["Changeflow", "FieldChanged", "PermanentTaskError", "Skip", "current_key"]

_WHERE = {
    "Changeflow": "changeflow.app",
    "FieldChanged": "changeflow.listener.routes",
    "PermanentTaskError": "changeflow.worker.errors",
    "Skip": "changeflow.worker.errors",
    "current_key": "changeflow.worker.idempotent",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'changeflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
