"""The Celery app: broker, serializer, acks, time limits and events, all from worker.settings.

`celery -A worker worker` and `celery -A worker flower` find `app` here (re-exported by worker/).
The listener publishes through this same app, so both sides share the serializer and task names.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init, worker_ready

from worker import broker
from worker.dedup import reset_dedup_store
from worker.idempotent import IdempotentTask
from worker.mongo import reset_db
from worker.serialization import register_bson_types
from worker.settings import Settings, SettingsError, get_settings

# A new domain module goes here; a new task in an existing module needs nothing but @task.
TASK_MODULES = ["tasks.email", "tasks.profiles", "tasks.analytics"]

app = Celery("changeflow", include=TASK_MODULES)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from changeflow's settings."""
    # URL, TLS options (verified unless the URL says otherwise) and Sentinel master as the listener's
    # publisher and the dedup store read them (worker/redis_conn.py).
    broker = settings.redis_target("celery_broker_url").kombu_config()
    return {
        "broker_url": broker["broker_url"],
        "broker_use_ssl": broker["broker_use_ssl"],
        "broker_connection_retry_on_startup": True,
        # Redis redelivers a message not acked within the visibility timeout: it must outlast the
        # longest task and the longest retry countdown (eta messages wait unacked in the worker).
        "broker_transport_options": {
            "visibility_timeout": settings.broker_visibility_timeout,
            **broker["transport_options"],
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        # At-least-once: ack after the task ran, requeue when the worker process dies mid-task,
        # and take one message at a time so a dying worker holds no extra prefetched ones.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        # Side effects only, nobody waits for results: no result backend.
        "task_ignore_result": True,
        # Flower.
        "worker_send_task_events": True,
        "worker_consumer": "worker.consumer:Consumer",  # task events sent in groups (see there)
        "task_send_sent_event": True,
        "enable_utc": True,
        "timezone": "UTC",
    }


def configure() -> Settings:
    """(Re)apply get_settings() to the app and drop clients made with older settings.

    Called on import; tests call it again after changing the environment and clearing
    get_settings' cache.
    """
    settings = get_settings()  # SettingsError: worker/settings.py checks every variable
    register_bson_types()
    broker.install()
    app.conf.update(celery_config(settings))
    app.close()  # pooled broker connections may point at the previous broker
    # Celery 5.7's close() keeps the producer pool, whose connections point at the old broker.
    app.amqp._producer_pool = None
    reset_db()
    reset_dedup_store()
    return settings


@worker_process_init.connect
def _reset_clients_after_fork(**_: object) -> None:
    # A prefork child must not reuse the parent's MongoDB/Redis sockets.
    reset_db()
    reset_dedup_store()
    gc.freeze()


@worker_ready.connect
def _freeze_startup_objects(**_: object) -> None:
    # Celery's start-up objects live as long as the process: moved out of the collector's reach, its
    # full passes no longer stall the consumer loop for 30-50 ms (docs/performance.md).
    gc.freeze()


def task(fn: Callable[..., Any]) -> Task:
    """Register `fn` as the changeflow task `tasks.<fn name>`, behind the dedup guard.

    The function takes one positional argument, the change event (trimmed, BSON types intact).
    """
    registered: Task = app.task(name=f"tasks.{fn.__name__}", base=IdempotentTask)(fn)
    return registered


def _configure_on_import() -> None:
    """configure(); bad settings under the `celery` command: one line on stderr and exit 2.

    Celery's command line would catch the SettingsError and print "Unable to load celery application"
    with the whole traceback. Anyone else importing worker gets the SettingsError (the listener
    reports it as one line itself).
    """
    try:
        configure()
    except SettingsError as exc:
        if not _loaded_by_celery_command():
            raise
        print(f"invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None  # celery catches Exception only; 2 as for other usage errors


def _loaded_by_celery_command() -> bool:
    import click

    context = click.get_current_context(silent=True)
    if context is None:
        return False
    from celery.bin.celery import celery as celery_command

    return context.find_root().command is celery_command


_configure_on_import()
