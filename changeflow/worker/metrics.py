"""The workers' Prometheus metrics: task outcomes, run time, dead letters.

The dedup guard (idempotent.py) reports each delivery's outcome: `done` (the effect happened and is
recorded), `duplicate` (the key was done already), `skip` (the task raised Skip), `dead_letter` (a
dead letter was stored; `changeflow_task_dead_letters_total` also counts it by reason). `retry`
(the delivery was handed back to run again: a transient error, a busy lease, a missing done record)
comes from Celery's task_retry signal; the run time from task_prerun/task_postrun.

With WORKER_METRICS_PORT set, the worker's main process serves `/metrics` on it (METRICS_HOST),
summing every pool process: prometheus-client's multiprocess mode. At worker_init (before the pool
forks) the worker uses PROMETHEUS_MULTIPROC_DIR when set (one directory per worker; its old files
are removed), else a fresh temporary directory removed at shutdown; each process writes its own
files there, and a pool process that exits is marked dead (its counters stay in the sums). The
server starts at worker_ready. Threads and solo pools write from the one process the same way.
Without WORKER_METRICS_PORT the counters live in each process's memory and nobody reads them.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any

from celery.signals import (
    task_postrun,
    task_prerun,
    task_retry,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from changeflow.worker.settings import get_settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OUTCOMES = ("done", "duplicate", "skip", "retry", "dead_letter")
WORKER_DEAD_LETTER_REASONS = ("permanent", "retries_exhausted", "undecodable")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Every metric this module defines (tests check that dashboards and alerts name only these).
METRIC_NAMES = (
    "changeflow_task_outcomes_total",
    "changeflow_task_duration_seconds",
    "changeflow_task_dead_letters_total",
)

_created_dir: str | None = None  # the temporary directory this process made (removed at shutdown)
_started: dict[tuple[str, int], float] = {}  # (task id, thread) -> perf_counter at task_prerun


class TaskMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        # registry=None: in multiprocess mode the values live in files the server's collector reads.
        self.outcomes = Counter(
            "changeflow_task_outcomes_total",
            "Deliveries of a task by how they ended",
            ["task", "outcome"],
            registry=None,
        )
        self.duration = Histogram(
            "changeflow_task_duration_seconds",
            "Run time of a task delivery (the dedup guard included)",
            ["task"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.dead_letters = Counter(
            "changeflow_task_dead_letters_total",
            "Dead letters stored by the workers",
            ["task", "reason"],
            registry=None,
        )
        # Children by labels, looked up once: labels() takes a lock and builds its key every call.
        self._outcome_children: dict[tuple[str, str], Any] = {}
        self._duration_children: dict[str, Any] = {}

    def count_outcome(self, task: str, what: str) -> None:
        child = self._outcome_children.get((task, what))
        if child is None:
            if what not in OUTCOMES:
                raise ValueError(f"unknown task outcome {what!r}")
            child = self._outcome_children[(task, what)] = self.outcomes.labels(task, what)
        child.inc()

    def observe_duration(self, task: str, seconds: float) -> None:
        child = self._duration_children.get(task)
        if child is None:
            child = self._duration_children[task] = self.duration.labels(task)
        child.observe(seconds)


_metrics: list[TaskMetrics] = []  # the process's metrics once made (empty: not yet)
_metrics_lock = threading.Lock()


def task_metrics() -> TaskMetrics:
    """The process's metrics, made once: under `-P threads` many tasks reach this first at the same
    time, and two sets of metric objects would each keep a share of the counts (multiprocess mode)."""
    if not _metrics:
        with _metrics_lock:
            if not _metrics:
                _metrics.append(TaskMetrics())
    return _metrics[0]


def _forget_task_metrics() -> None:
    with _metrics_lock:
        _metrics.clear()


def outcome(task: str, what: str) -> None:
    """Count one delivery of `task` ending as `what` (one of OUTCOMES)."""
    task_metrics().count_outcome(task, what)


def dead_letter_stored(task: str, reason: str) -> None:
    metrics = task_metrics()
    metrics.outcomes.labels(task, "dead_letter").inc()
    metrics.dead_letters.labels(task, reason).inc()


def prepare_multiprocess_dir(env: dict[str, str] | Any = os.environ) -> str:
    """Make the multiprocess directory ready before any metric exists; returns it.

    Set up before the pool forks, so every pool process inherits it. prometheus-client picks its
    value class when imported: it is picked again here in case something imported it earlier.
    """
    global _created_dir
    path = env.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):  # an earlier run's counts are not ours
            os.remove(stale)
    else:
        path = _created_dir = tempfile.mkdtemp(prefix="changeflow-worker-metrics-")
        env[MULTIPROC_ENV] = path
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    _forget_task_metrics()
    return path


def serve(host: str, port: int) -> None:
    """Serve the sum over the multiprocess directory on host:port (a daemon thread)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)
    log.info("worker metrics on http://%s:%d/metrics", host, port)


@worker_init.connect
def _on_worker_init(**_: object) -> None:
    if get_settings().worker_metrics_port is not None:
        prepare_multiprocess_dir()


def declare(task_names: Iterable[str]) -> None:
    """Show every task's outcomes and dead letters at 0 before the first one: an alert on their
    increase then sees the first dead letter too (a series that starts at 1 has no increase)."""
    metrics = task_metrics()
    for task in task_names:
        for what in OUTCOMES:
            metrics.outcomes.labels(task, what)
        for reason in WORKER_DEAD_LETTER_REASONS:
            metrics.dead_letters.labels(task, reason)


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: object) -> None:
    settings = get_settings()
    if settings.worker_metrics_port is None:
        return
    app = getattr(sender, "app", None)
    if app is not None:
        declare(name for name in app.tasks if not name.startswith("celery."))
    try:
        serve(settings.metrics_host, settings.worker_metrics_port)
    except OSError as exc:
        # The worker runs its tasks anyway; say loudly why its metrics are missing.
        log.error(
            "WORKER_METRICS_PORT: cannot serve metrics on %s:%d: %s",
            settings.metrics_host, settings.worker_metrics_port, exc,
        )  # fmt: skip


@worker_process_shutdown.connect
def _on_pool_process_exit(**_: object) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


@worker_shutdown.connect
def _on_worker_shutdown(**_: object) -> None:
    if _created_dir is not None:
        shutil.rmtree(_created_dir, ignore_errors=True)


@task_prerun.connect
def _on_task_start(task_id: str | None = None, **_: object) -> None:
    _started[(str(task_id), threading.get_ident())] = time.perf_counter()


@task_postrun.connect
def _on_task_end(task_id: str | None = None, task: Any = None, **_: object) -> None:
    started = _started.pop((str(task_id), threading.get_ident()), None)
    if started is not None and task is not None:
        task_metrics().observe_duration(task.name, time.perf_counter() - started)


@task_retry.connect
def _on_task_retry(sender: Any = None, **_: object) -> None:
    if sender is not None:
        outcome(sender.name, "retry")
