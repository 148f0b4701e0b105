"""The workers' metrics summed over threads and forked pool processes (prometheus-client's
multiprocess mode), in a subprocess of its own: the mode is chosen per process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from changeflow.worker.metrics import OUTCOMES, outcome

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, sys, threading
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    from prometheus_client.multiprocess import MultiProcessCollector
    from changeflow.worker import metrics

    path = metrics.prepare_multiprocess_dir(os.environ)
    metrics.declare(["t", "u"])

    def work(count):
        for _ in range(count):
            metrics.outcome("t", "done")
        metrics.task_metrics().duration.labels("t").observe(0.01)

    threads = [threading.Thread(target=work, args=(100,)) for _ in range(4)]  # the threads pool
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    children = []
    for _ in range(2):  # prefork pool processes, forked after the directory was set up
        pid = os.fork()
        if pid == 0:
            work(50)
            metrics.dead_letter_stored("t", "permanent")
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
        multiprocess.mark_process_dead(pid, path)  # what worker_process_shutdown does in the child
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)
    sys.stdout.write(generate_latest(registry).decode())
    """
)


def test_counts_from_threads_and_forked_processes_add_up() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = set(result.stdout.splitlines())
    assert 'changeflow_task_outcomes_total{outcome="done",task="t"} 500.0' in lines
    assert 'changeflow_task_outcomes_total{outcome="dead_letter",task="t"} 2.0' in lines
    assert 'changeflow_task_dead_letters_total{reason="permanent",task="t"} 2.0' in lines
    assert 'changeflow_task_duration_seconds_count{task="t"} 6.0' in lines  # 4 threads + 2 processes
    # Declared series show 0 before their first count (alerts on increase() see the first one).
    assert 'changeflow_task_outcomes_total{outcome="retry",task="u"} 0.0' in lines
    assert 'changeflow_task_dead_letters_total{reason="retries_exhausted",task="u"} 0.0' in lines


def test_an_unknown_outcome_is_refused() -> None:
    assert "done" in OUTCOMES
    with pytest.raises(ValueError, match="unknown task outcome 'finished'"):
        outcome("t", "finished")
