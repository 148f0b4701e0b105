"""changeflow's worker side: the Celery app and the contract the listener shares with it."""

from worker.app import app, configure, task

__all__ = ["app", "configure", "task"]
