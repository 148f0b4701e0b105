"""changeflow's worker app as the fault suite runs it: `celery -A tests.faults.fault_worker worker`.

The app is this repository's own (`worker.app`, tasks/app.py), same settings and tasks,
with two test-only additions:

- Redelivery sweep. kombu's Redis transport (5.7) looks for unacked messages older than the visibility
  timeout only every `unacked_restore_interval * unacked_restore_throttle` seconds (10 * 10 by
  default), so a SIGKILLed worker's task comes back after the visibility timeout plus up to 100 s.
  Here the sweep runs every second, so a scenario with a 10 s visibility timeout recovers in seconds.
- A slow-task knob. While the file named by `CHANGEFLOW_TEST_SLOW_FLAG` exists, every task sleeps
  `CHANGEFLOW_TEST_TASK_DELAY_MS` milliseconds after its body returned (the side effect happened: the
  email was accepted by SMTP, the profile upserted, the counter incremented) and before the dedup guard
  records the key as done. That is the window the README names: a worker killed inside it runs the
  task again on redelivery. Entering the window is logged as

      fault-window <task name> <task id>: ...

  so the fault suite can kill a worker exactly there and knows which keys were exposed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from celery import Task

from tests.faults.knobs import DELAY_ENV, FLAG_ENV, WINDOW_LOG
from worker import app  # this repository's app, its modules discovered

log = logging.getLogger("changeflow.faults")


def _slow_after_body(task: Task) -> None:
    body: Callable[..., Any] = task.run

    @wraps(body)
    def run(*args: Any, **kwargs: Any) -> Any:
        result = body(*args, **kwargs)
        flag = os.environ.get(FLAG_ENV)
        if flag and os.path.exists(flag):
            delay_ms = int(os.environ.get(DELAY_ENV, "2000"))
            log.warning(
                "%s %s %s: effect done, %d ms before the key is recorded",
                WINDOW_LOG,
                task.name,
                task.request.id,
                delay_ms,
            )
            time.sleep(delay_ms / 1000)
        return result

    # IdempotentTask._run_once calls self.run(...): an instance attribute shadows the class's body.
    task.run = run


app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}
for _name, _task in app.tasks.items():
    if _name.startswith("tasks."):
        _slow_after_body(_task)

__all__ = ["app"]
