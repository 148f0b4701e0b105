"""Names shared by the fault scenarios and tests/faults/fault_worker.py (which must not be imported
in the test process: importing it changes worker.app)."""

FAULT_WORKER = "tests.faults.fault_worker"  # `celery -A` module of the fault suite's worker app
FLAG_ENV = "CHANGEFLOW_TEST_SLOW_FLAG"  # while this file exists, tasks pause inside the window
DELAY_ENV = "CHANGEFLOW_TEST_TASK_DELAY_MS"  # how long they pause (milliseconds)
WINDOW_LOG = "fault-window"  # logged by a task entering the window: "fault-window <task> <id>: ..."
