"""A plain Celery app with changeflow's worker settings and one no-op task, *not* behind the guard.

`celery -A bench.plain_app worker` is bench 7's baseline (bench/guard_overhead.py): the same Celery
configuration as a changeflow app (`celery_config`: acks late, prefetch 1, task events on, the same
broker transport and consumer, the BSON types in the serializer), the same task name, a plain
`celery.Task`. What changeflow's `tasks.noop` costs on top of it is the dedup guard's (and the
changeflow app's own per-task work).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from changeflow.worker import broker
from changeflow.worker.app import celery_config
from changeflow.worker.serialization import register_bson_types
from changeflow.worker.settings import get_settings

__all__ = ["app", "noop"]

register_bson_types()
broker.install()
app = Celery("plain")
app.conf.update(celery_config(get_settings()))


@app.task(name="tasks.noop")
def noop(event: dict[str, Any]) -> None:
    """Nothing: what is left is Celery's own cost per task."""
