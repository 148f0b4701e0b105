"""The dedup guard: a Celery Task base class that runs each key's effect once.

The key is the Celery task id, which the listener sets to `dedup_key(event["_id"], task_name)`.

    done already          -> log "duplicate <task> <key>" (INFO), return, no effect
    lease held elsewhere  -> retry in a few seconds, without using up a retry
    body returns          -> mark done, release the lease
    body raises Skip      -> log the skip (INFO), mark done
    PermanentTaskError    -> release the lease, dead letter "permanent", fail (not done: replayable)
    transient error       -> release the lease, retry with backoff; after TASK_MAX_RETRIES
                             dead letter "retries_exhausted", fail
    any other exception   -> a bug or bad data that the same input will hit again: dead letter
                             "permanent", fail
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
import uuid
from collections.abc import Mapping
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task, current_task
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded

from worker.dead_letters import record_dead_letter
from worker.dedup import Claim, DedupStore, get_dedup_store
from worker.errors import TRANSIENT_ERRORS, Skip
from worker.mongo import get_db
from worker.retry import lease_retry_delay, retry_delay
from worker.settings import get_settings

log = logging.getLogger(__name__)


class IdempotentTask(Task):
    """Base class of changeflow's tasks (see the module docstring for the outcomes)."""

    # The guard enforces TASK_MAX_RETRIES (or a task's own max_retries) itself, before Celery's
    # retry() would (it must also dead-letter); Celery's default limit is off.
    max_retries = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            # A plain function call (a shell, a unit test): no task id, so no key and no guard.
            return super().__call__(*args, **kwargs)
        try:
            return self._run_once(request.id, args, kwargs)
        except (Retry, Ignore, Reject):
            raise
        except TRANSIENT_ERRORS as exc:
            # A task's own max_retries (`@app.on(..., max_retries=N)`), else TASK_MAX_RETRIES.
            max_retries = self.max_retries
            if max_retries is None:
                max_retries = get_settings().task_max_retries
            if request.retries >= max_retries:
                self._dead_letter_current(exc, "retries_exhausted", args, kwargs)
                raise
            delay = retry_delay(request.retries, get_settings().retry_backoff_max)
            try:
                retry = self.retry(exc=exc, countdown=delay, throw=False)
            except Reject as reject:
                # Celery could not publish the retry (the broker is down too) and would drop the
                # message (requeue=False): hand it back instead, it runs again once the broker is back.
                raise Reject(reject.reason, requeue=True) from exc
            raise retry from exc
        except Exception as exc:
            # PermanentTaskError, or a bug / bad data the same input hits again: retrying cannot help.
            self._dead_letter_current(exc, "permanent", args, kwargs)
            raise

    def on_failure(
        self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: ExceptionInfo | None
    ) -> None:
        # The hard time limit kills the pool process, so __call__ never sees it; Celery then calls
        # this in the main process and acks the message. Keep the event as a dead letter.
        if isinstance(exc, TimeLimitExceeded):
            limit = exc.args[0] if exc.args else get_settings().task_time_limit
            error = f"TimeLimitExceeded: hard time limit ({limit}s) exceeded, the pool process was killed"
            # The retry count died with the process: 1 is a lower bound.
            self._dead_letter(task_id, tuple(args or ()), kwargs or {}, error, None, 1, "permanent")

    def _run_once(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        store = get_dedup_store()
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        claim = store.claim(key, owner)
        if claim is Claim.DONE:
            log.info("duplicate %s %s", self.name, key)
            return None
        if claim is Claim.BUSY:
            raise self._retry_while_leased(key, args, kwargs)
        try:
            result = self.run(*args, **kwargs)
        except Skip as skip:
            store.mark_done(key, owner, "skipped")
            log.info("skip %s %s: %s", self.name, key, skip)
            return None
        except BaseException:
            self._release(store, key, owner)
            raise
        store.mark_done(key, owner, "ok")
        return result

    def _retry_while_leased(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Retry:
        """Another delivery of this key is running: look again later, keeping the retry count."""
        delay = lease_retry_delay()
        log.info("lease busy %s %s: another delivery is running it, retry in %.1fs", self.name, key, delay)
        request = self.request
        if not request.is_eager:
            # Not self.retry(): that would count against TASK_MAX_RETRIES. Same id, same retries.
            signature = self.signature_from_request(
                request, args, kwargs, countdown=delay, retries=request.retries
            )
            try:
                signature.apply_async()
            except Exception as exc:
                # The broker refused the copy: hand the original message back instead of losing it.
                raise Reject(exc, requeue=True) from exc
        # Under apply() (tests, eager) the retry is not re-run: the lease would still be held.
        return Retry(f"the lease on {key} is held by another delivery", when=delay)

    @staticmethod
    def _release(store: DedupStore, key: str, owner: str) -> None:
        try:
            store.release_lease(key, owner)
        except Exception:
            # Not fatal: the lease expires on its own; the task's own error matters more.
            log.warning("could not release the lease on %s; it will expire", key, exc_info=True)

    def _dead_letter_current(
        self, exc: BaseException, reason: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Dead-letter the running request (called from inside its except clause)."""
        error = f"{type(exc).__name__}: {exc}"
        attempts = self.request.retries + 1
        self._dead_letter(self.request.id, args, kwargs, error, traceback.format_exc(), attempts, reason)

    def _dead_letter(
        self,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: str,
        trace: str | None,
        attempts: int,
        reason: str,
    ) -> None:
        payload = args[0] if len(args) == 1 and isinstance(args[0], Mapping) else {"args": args, **kwargs}
        try:
            record_dead_letter(
                get_db(),
                task_name=self.name,
                task_id=task_id,
                payload=payload,
                error=error,
                traceback=trace,
                attempts=attempts,
                reason=reason,
            )
        except Exception:
            # MongoDB is down too: the error log (and Celery's failure log) are all that is left.
            log.exception("could not record the dead letter of %s %s: %s", self.name, task_id, error)


def current_key() -> str:
    """The dedup key of the task running now (its task id): for Message-IDs and markers."""
    task = current_task
    key = getattr(getattr(task, "request", None), "id", None)
    if not key:
        raise RuntimeError("current_key() is only available inside a running changeflow task")
    return str(key)
