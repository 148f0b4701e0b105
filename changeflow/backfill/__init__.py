"""Backfills: run one task of the app over the documents that already exist (docs/backfill.md).

`changeflow backfill -A APP --collection C --task T [--filter JSON] ...` reads C in `_id` order and
publishes one insert-shaped event per document through the listener's publisher, saving its
position after each batch in `changeflow_backfills`, so an interrupted backfill resumes by its id.

Pure parts: events.py (event and message building), position.py (the `_id` range queries),
rate.py (token bucket), progress.py (progress rendering). I/O: store.py (the records), runner.py
(the loop), cli.py (the command).
"""
