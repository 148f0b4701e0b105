"""This repository's app (worker.app) with batching off: `tasks.update_analytics` in batches of one.

For the batch latency benchmark's comparison (bench/batch_latency.py): the listener then sends one
message per event (a chunk of one is the event's single message) and the same guard and handler run
each event alone, as before batching existed.
"""

from __future__ import annotations

from tasks.analytics import update_analytics
from worker import app

__all__ = ["app"]

update_analytics.batch_size = 1
