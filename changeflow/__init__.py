"""changeflow: reliable side effects from MongoDB writes, declared in a team's own package.

    from changeflow import Changeflow, FieldChanged

    app = Changeflow("acme")

    @app.on("invoices", "insert")
    def send_invoice(event): ...

Importing this package configures nothing and reads no environment: settings are read when an app
is created. `celery -A acme.effects worker` and `changeflow listen -A acme.effects` run it.
"""

from changeflow.app import Changeflow
from listener.routes import FieldChanged
from worker.errors import PermanentTaskError, Skip
from worker.idempotent import current_key

__all__ = ["Changeflow", "FieldChanged", "PermanentTaskError", "Skip", "current_key"]
