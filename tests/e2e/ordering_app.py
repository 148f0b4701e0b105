"""A test-only app for per-key ordering: the same notification, ordered per order and not.

Both tasks email the order's status for each insert and status change of `orders`, after a random
0-ORDERING_MAX_LATENCY_MS ms delay, and fail transiently (before sending) with probability
ORDERING_FAILURE_RATE, so the guard retries them. `notify_ordered` is declared `ordered_by=True`
(per document key); `notify_unordered` is not. The subject says which, the order and the status.
Latency and failure rate are read from the environment when a task runs (defaults 20 ms, 0.1);
ORDERING_DEAD_STATUS names a status whose ordered notification fails permanently (a dead letter).
"""

from __future__ import annotations

import os
import random
import smtplib
import time
from email.message import EmailMessage
from typing import Any

from changeflow import Changeflow, FieldChanged, current_key
from changeflow.worker.errors import PermanentTaskError, TransientTaskError
from changeflow.worker.settings import get_settings

app = Changeflow("ordering_app", package=__name__)


def _notify(label: str, event: dict[str, Any]) -> None:
    time.sleep(random.uniform(0, float(os.environ.get("ORDERING_MAX_LATENCY_MS", "20")) / 1000))
    if random.random() < float(os.environ.get("ORDERING_FAILURE_RATE", "0.1")):
        raise TransientTaskError("injected transient failure")  # before the effect: retried
    # The status this event set (fullDocument is looked up later and may be a newer one).
    updated = (event.get("updateDescription") or {}).get("updatedFields") or {}
    status = updated.get("status") or (event["fullDocument"] or {}).get("status")
    if label == "ordered" and status == os.environ.get("ORDERING_DEAD_STATUS"):
        raise PermanentTaskError(f"injected permanent failure for {status}")
    message = EmailMessage()
    message["From"] = "changeflow <no-reply@example.test>"
    message["To"] = "customer@example.test"
    message["Subject"] = f"{label} {event['documentKey']['_id']} {status}"
    message["Message-ID"] = f"<{current_key()}@changeflow>"
    message.set_content("status changed")
    settings = get_settings()
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=20) as smtp:
        smtp.send_message(message)


@app.on("orders", "update", when=FieldChanged("status"))
@app.on("orders", "insert", name="ordering_app.notify_ordered", ordered_by=True)  # for all its routes
def notify_ordered(event: dict[str, Any]) -> None:
    _notify("ordered", event)


@app.on("orders", "update", when=FieldChanged("status"))
@app.on("orders", "insert", name="ordering_app.notify_unordered")
def notify_unordered(event: dict[str, Any]) -> None:
    _notify("unordered", event)
