"""The Celery configuration every changeflow app gets: broker, serializer, acks, time limits, events.

`changeflow.Changeflow` applies `celery_config(settings)` when an app is created; this repository's own
app is tasks/app.py (`celery -A worker worker` finds it through worker/__init__.py). The listener
publishes through the same app, so both sides share the serializer and task names.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from celery.signals import worker_process_init, worker_ready

from changeflow.worker.dedup import reset_dedup_store
from changeflow.worker.mongo import reset_db
from changeflow.worker.settings import Settings, get_settings

log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from changeflow's settings."""
    # URL, TLS options (verified unless the URL says otherwise) and Sentinel master as the listener's
    # publisher and the dedup store read them (changeflow/worker/redis_conn.py).
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
        "worker_consumer": "changeflow.worker.consumer:Consumer",  # task events sent in groups (see there)
        "task_send_sent_event": True,
        "enable_utc": True,
        "timezone": "UTC",
    }


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


@worker_ready.connect
def _say_which_time_limits_hold(sender: Any = None, **_: object) -> None:
    """Celery enforces time limits by pool: both under prefork; under gevent only the hard one, at the
    task's next I/O wait; none under threads. Said once at start, so nobody counts on a missing one."""
    pool = type(getattr(sender, "pool", None)).__module__
    settings = get_settings()
    if pool == "celery.concurrency.thread":
        log.warning(
            "-P threads: TASK_SOFT_TIME_LIMIT (%ss) and TASK_TIME_LIMIT (%ss) are not enforced; every effect "
            "needs timeouts of its own (docs/performance.md, pools for slow effects)",
            settings.task_soft_time_limit, settings.task_time_limit,
        )  # fmt: skip
    elif pool in ("celery.concurrency.gevent", "celery.concurrency.eventlet"):
        log.warning(
            "-P %s: TASK_SOFT_TIME_LIMIT (%ss) is not enforced; TASK_TIME_LIMIT (%ss) interrupts a task "
            "only at its next I/O wait (docs/performance.md, pools for slow effects)",
            pool.rsplit(".", 1)[1], settings.task_soft_time_limit, settings.task_time_limit,
        )  # fmt: skip
