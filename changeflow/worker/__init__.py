"""changeflow's worker side: the dedup guard, Celery configuration, and the contract the listener shares.

Settings (`settings.py`), the serializer, dedup keys, the guard (`dedup.py`, `idempotent.py`), retries
and dead letters. Importing it creates no app and reads no environment. A deployment's workers are
Celery's own: `celery -A acme.effects worker` (this repository's: `celery -A worker worker`).
"""
