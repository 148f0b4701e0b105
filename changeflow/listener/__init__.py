"""The listener: MongoDB change stream -> Celery task messages on Redis.

Read in this order: `routes.py` (which events trigger which tasks), `payload.py` (what a task
receives), `publish.py` (messages and the broker), `checkpoints.py` (where the position is kept),
`stream.py` (the loop that ties them together), `__main__.py` (the `python -m listener` CLI).
The routes themselves belong to an app (changeflow.Changeflow, `-A`), declared beside its tasks.
"""

from changeflow.listener.routes import FieldChanged, Route, compile_match, tasks_for

__all__ = ["FieldChanged", "Route", "compile_match", "tasks_for"]
