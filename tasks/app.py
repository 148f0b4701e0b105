"""This repository's own changeflow app: the card's four side effects (`celery -A worker worker`).

Every module of this package is imported when the app is loaded (changeflow's discovery), so a new
side effect is one `@app.on` function in any module here. The tasks keep their historical names
(`tasks.<function>`): dedup keys and stored dead letters use them.
"""

from __future__ import annotations

from changeflow import Changeflow

app = Changeflow("tasks")

__all__ = ["app"]
