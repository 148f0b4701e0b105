"""The dedup guard: a Celery Task base class that runs each key's effect once.

The key is the Celery task id, which the listener sets to `dedup_key(event["_id"], task_name)`.

    done already          -> log "duplicate <task> <key>" (INFO), return, no effect
    lease held elsewhere  -> retry in a few seconds, without using up a retry
    body returns          -> mark done, release the lease
    body raises Skip      -> log the skip (INFO), mark done
    PermanentTaskError    -> release the lease, dead letter "permanent", fail (not done: replayable)
    transient error       -> release the lease, retry with backoff (capped at RETRY_BACKOFF_MAX)
                             while less than TASK_RETRY_FOR_SECONDS passed since the first attempt
                             (and, if set, at most TASK_MAX_RETRIES times); then dead letter
                             "retries_exhausted", fail. Transient: changeflow.worker.errors.is_transient,
                             including Redis replies such as OOM, READONLY, LOADING, BUSY, MASTERDOWN
    any other exception   -> a bug or bad data that the same input will hit again: dead letter
                             "permanent", fail
    dead letter refused   -> (MongoDB down, or refusing the write: auth, fail point) the message is
                             not acked and forgotten: it is handed back with backoff (a retry, same
                             id, key not done) and runs again; it then succeeds, or fails again and
                             tries its dead letter again. Backoff as for a transient error.
                             (Under apply(), eager: no message to lose, the task fails.)
    done record refused   -> the effect happened but mark_done failed (Redis OOM, down, ...): the
                             message is handed back with a header saying so; the next delivery only
                             records the key as done, it does not run the body again. Past the
                             time budget the guard stops trying: the effect stays, no dead letter
                             (nothing failed), logged at ERROR: only a later duplicate would repeat it.
    hard time limit kill  -> the pool process is gone; in the main process: dead letter "permanent".
                             If MongoDB refuses it, a copy of the message (same id) is published to
                             run again after RETRY_BACKOFF_MAX s (its retry count starts again).

The time of the first attempt travels with the retries in the message header `changeflow_first_attempt`
(Celery copies a request's custom headers into its retry messages).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Mapping
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task, current_task
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded

from changeflow.worker.backfill import fresh_args
from changeflow.worker.dead_letters import record_dead_letter
from changeflow.worker.dedup import Claim, DedupStore, get_dedup_store
from changeflow.worker.errors import Skip, is_transient
from changeflow.worker.mongo import get_db
from changeflow.worker.retry import lease_retry_delay, may_retry, retry_delay
from changeflow.worker.settings import get_settings

log = logging.getLogger(__name__)

# Message headers the guard adds to its retries (Celery keeps a request's custom headers on retry).
FIRST_ATTEMPT_HEADER = "changeflow_first_attempt"  # epoch seconds when the first attempt started
EFFECT_DONE_HEADER = "changeflow_effect_done"  # the effect happened, only its done record is missing


class _DoneNotRecorded(Exception):
    """The body's effect happened but the dedup store refused the done record (cause: __cause__)."""

    def __init__(self, outcome: str) -> None:
        super().__init__(f"the effect happened, its done record ({outcome}) could not be stored")
        self.outcome = outcome


def header(request: Any, name: str) -> Any:
    """A custom header of the running request (worker: request.headers; apply(): its headers=)."""
    headers = getattr(request, "headers", None)
    if isinstance(headers, Mapping) and name in headers:
        return headers[name]
    return getattr(request, name, None)


def first_attempt_at(request: Any, default: float) -> float:
    """When the task's first attempt started (from the header), else `default` (this attempt)."""
    value = header(request, FIRST_ATTEMPT_HEADER)
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default  # a header someone else wrote: count from now rather than fail


class IdempotentTask(Task):
    """Base class of changeflow's tasks (see the module docstring for the outcomes)."""

    # The guard enforces its retry budget (and a task's own max_retries) itself, before Celery's
    # retry() would (it must also dead-letter); Celery's default limit is off.
    max_retries = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            # A plain function call (a shell, a unit test): no task id, so no key and no guard.
            return super().__call__(*args, **kwargs)
        first = first_attempt_at(request, time.time())
        try:
            return self._run_once(request.id, args, kwargs)
        except (Retry, Ignore, Reject):
            raise
        except _DoneNotRecorded as failure:
            return self._done_not_recorded(failure.__cause__ or failure, failure.outcome, first)
        except Exception as exc:
            recorded_effect = header(request, EFFECT_DONE_HEADER)
            if recorded_effect is not None:
                # The effect happened on an earlier delivery: never a dead letter, whatever failed now.
                return self._done_not_recorded(exc, str(recorded_effect), first)
            transient = is_transient(exc)
            if transient and self._may_retry(first):
                raise self._hand_back(exc, first) from exc
            reason = "retries_exhausted" if transient else "permanent"
            # PermanentTaskError, or a bug / bad data the same input hits again: retrying cannot help.
            error = f"{type(exc).__name__}: {exc}"
            try:
                self._dead_letter(
                    request.id, args, kwargs, error, traceback.format_exc(), request.retries + 1, reason
                )
            except Exception:
                if request.is_eager:
                    # apply(): no message to lose, the caller gets the failure (and would loop here).
                    log.exception("could not record the dead letter of %s %s", self.name, request.id)
                    raise exc from None
                log.exception(
                    "could not record the dead letter of %s %s (%s: %s); the task runs again later",
                    self.name, request.id, reason, error,
                )  # fmt: skip
                raise self._hand_back(exc, first) from exc
            raise

    def on_failure(
        self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: ExceptionInfo | None
    ) -> None:
        # The hard time limit kills the pool process, so __call__ never sees it; Celery then calls
        # this in the main process and acks the message. Keep the event as a dead letter.
        if not isinstance(exc, TimeLimitExceeded):
            return
        limit = exc.args[0] if exc.args else get_settings().task_time_limit
        error = f"TimeLimitExceeded: hard time limit ({limit}s) exceeded, the pool process was killed"
        args, kwargs = tuple(args or ()), kwargs or {}
        try:
            # The retry count died with the process: 1 is a lower bound.
            self._dead_letter(task_id, args, kwargs, error, None, 1, "permanent")
        except Exception:
            # The message is acked after this: publish a copy (same id) instead of losing the task.
            delay = get_settings().retry_backoff_max
            log.exception(
                "could not record the dead letter of %s %s (%s); it runs again in %ss",
                self.name, task_id, error, delay,
            )  # fmt: skip
            try:
                self.apply_async(args=args, kwargs=kwargs, task_id=task_id, countdown=delay)
            except Exception:
                log.exception("the broker refused the copy of %s %s too: it is lost", self.name, task_id)

    def _may_retry(self, first: float) -> bool:
        settings = get_settings()
        return may_retry(
            first_attempt_at=first,
            now=time.time(),
            retries=self.request.retries,
            retry_for_seconds=settings.task_retry_for_seconds,
            # A task's own max_retries (`@app.on(..., max_retries=N)`), else TASK_MAX_RETRIES.
            max_retries=settings.task_max_retries if self.max_retries is None else self.max_retries,
        )

    def _hand_back(self, exc: BaseException, first: float, **headers: str) -> Retry:
        """Retry the running request with backoff, its first-attempt time (and `headers`) kept."""
        request = self.request
        delay = retry_delay(request.retries, get_settings().retry_backoff_max)
        kept = {**(request.headers or {}), FIRST_ATTEMPT_HEADER: first, **headers}
        try:
            return self.retry(exc=exc, countdown=delay, throw=False, headers=kept)  # type: ignore[arg-type]
        except Reject as reject:
            # Celery could not publish the retry (the broker is down too) and would drop the
            # message (requeue=False): hand it back instead, it runs again once the broker is back.
            raise Reject(reject.reason, requeue=True) from exc

    def _done_not_recorded(self, cause: BaseException, outcome: str, first: float) -> None:
        """The effect happened, its done record is missing: retry the record alone, within the budget."""
        key = self.request.id
        if self._may_retry(first):
            log.warning(
                "%s %s: the effect happened, its done record failed (%s: %s); only the record is retried",
                self.name, key, type(cause).__name__, cause,
            )  # fmt: skip
            raise self._hand_back(cause, first, **{EFFECT_DONE_HEADER: outcome}) from cause
        log.error(
            "%s %s: the effect happened, but its done record could not be stored within "
            "TASK_RETRY_FOR_SECONDS (%s: %s); a later duplicate delivery would repeat the effect",
            self.name, key, type(cause).__name__, cause,
        )  # fmt: skip
        return None

    def _run_once(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        store = get_dedup_store()
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        claim = store.claim(key, owner)
        if claim is Claim.DONE:
            log.info("duplicate %s %s", self.name, key)
            return None
        if claim is Claim.BUSY:
            raise self._retry_while_leased(key, args, kwargs)
        recorded_effect = header(self.request, EFFECT_DONE_HEADER)
        if recorded_effect is not None:
            # An earlier delivery ran the body; only its done record is missing. Never run it again.
            self._mark_done(store, key, owner, str(recorded_effect))
            log.info("done record stored %s %s (the effect happened on an earlier delivery)", self.name, key)
            return None
        try:
            # A backfill event gets its document as it is now (changeflow.worker.backfill).
            result = self.run(*fresh_args(args), **kwargs)
        except Skip as skip:
            self._mark_done(store, key, owner, "skipped")
            log.info("skip %s %s: %s", self.name, key, skip)
            return None
        except BaseException:
            self._release(store, key, owner)
            raise
        self._mark_done(store, key, owner, "ok")
        return result

    def _mark_done(self, store: DedupStore, key: str, owner: str, outcome: str) -> None:
        try:
            store.mark_done(key, owner, outcome)
        except Exception as exc:
            self._release(store, key, owner)  # if Redis takes that: the next delivery need not wait
            raise _DoneNotRecorded(outcome) from exc

    def _retry_while_leased(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Retry:
        """Another delivery of this key is running: look again later, keeping the retry count."""
        delay = lease_retry_delay()
        log.info("lease busy %s %s: another delivery is running it, retry in %.1fs", self.name, key, delay)
        request = self.request
        if not request.is_eager:
            # Not self.retry(): that would count as a retry. Same id, same retries, same headers.
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
        """Store the dead letter; raises what MongoDB raised (the caller must not lose the task)."""
        payload = args[0] if len(args) == 1 and isinstance(args[0], Mapping) else {"args": args, **kwargs}
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


def current_key() -> str:
    """The dedup key of the task running now (its task id): for Message-IDs and markers."""
    task = current_task
    key = getattr(getattr(task, "request", None), "id", None)
    if not key:
        raise RuntimeError("current_key() is only available inside a running changeflow task")
    return str(key)
