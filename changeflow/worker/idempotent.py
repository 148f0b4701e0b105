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

An ordered task (`ordered_by`; its message carries the ordering headers, changeflow/worker/ordering.py)
first passes the key's gate: not the key's head -> parked (stored in Redis, acked, no effect); when
the head ends (done, duplicate, skip, dead letter) the guard advances the key and runs the new head's
parked message inline, in this process and through this same guard (a chain: ORDERED_CHAIN_MAX_TASKS,
ORDERED_CHAIN_MAX_SECONDS), or past the chain's bounds publishes it again, all before its own message
is acked. Retries keep the head in place (a chained task's retry is a message of its own).
docs/ordering.md.

The time of the first attempt travels with the retries in the message header `changeflow_first_attempt`
(Celery copies a request's custom headers into its retry messages).
"""

from __future__ import annotations

import itertools
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
from celery.app.task import Context
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded
from kombu.serialization import dumps, loads

from changeflow.worker.backfill import fresh_args
from changeflow.worker.dead_letters import record_dead_letter
from changeflow.worker.dedup import Claim, DedupStore, get_dedup_store
from changeflow.worker.errors import Skip, TransientTaskError, is_transient
from changeflow.worker.keys import dedup_key
from changeflow.worker.metrics import dead_letter_stored, outcome
from changeflow.worker.mongo import get_db
from changeflow.worker.ordering import (
    KEY_HEADER,
    MEMBER_HEADER,
    Gate,
    Order,
    OrderBook,
    chain_may_run,
    order_headers,
)
from changeflow.worker.retry import lease_retry_delay, may_retry, retry_delay
from changeflow.worker.settings import get_settings

log = logging.getLogger(__name__)

# Message headers the guard adds to its retries (Celery keeps a request's custom headers on retry).
FIRST_ATTEMPT_HEADER = "changeflow_first_attempt"  # epoch seconds when the first attempt started
EFFECT_DONE_HEADER = "changeflow_effect_done"  # the effect happened, only its done record is missing
# Attributes of a request context (not headers: never published). The monotonic time the delivered
# message's run started; and on a request run inline in a chain, its `_Chain`.
_STARTED_ATTR = "changeflow_started"
_CHAIN_ATTR = "changeflow_chain"


class _Chain:
    """A task run inline hands the next parked message of its key to the chain's driver here."""

    def __init__(self) -> None:
        self.next: bytes | None = None


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
        if getattr(request, _CHAIN_ATTR, None) is None:
            setattr(request, _STARTED_ATTR, time.monotonic())
        return self._guard(args, kwargs)

    def _guard(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The guarded run of the current request (a delivered message's, or one run inline)."""
        request = self.request
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
                    request.id, args, kwargs, error, traceback.format_exc(), request.retries + 1, reason,
                    request_order(request),
                )  # fmt: skip
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
            order = request_order(request)
            if order is not None:
                try:
                    self._advance(order)  # the key moves on past its dead letter
                except Exception as advance_exc:
                    log.exception(
                        "%s %s: could not advance its key past the dead letter", self.name, request.id
                    )
                    raise self._hand_back(advance_exc, first) from exc
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
        # The request (and its headers) is not at hand here: the order comes from the payload.
        order = self._payload_order(args)
        if order is not None and _is_done(task_id):
            # It ended, then the limit hit a task of its key run inline after it (a chain): that one
            # is published again from its parked copy (kept until it ends) by the advance below.
            log.error(
                "%s %s: the hard time limit (%ss) killed a task its key's chain ran after it",
                self.name, task_id, limit,
            )  # fmt: skip
            try:
                self._advance(order, inline=False)
            except Exception:
                log.exception(
                    "%s %s: could not advance key %r (docs/ordering.md)", self.name, task_id, order.key
                )
            return
        try:
            # The retry count died with the process: 1 is a lower bound.
            self._dead_letter(task_id, args, kwargs, error, None, 1, "permanent", order)
        except Exception:
            # The message is acked after this: publish a copy (same id) instead of losing the task.
            delay = get_settings().retry_backoff_max
            log.exception(
                "could not record the dead letter of %s %s (%s); it runs again in %ss",
                self.name, task_id, error, delay,
            )  # fmt: skip
            try:
                headers = order_headers(order) if order is not None else None
                self.apply_async(args=args, kwargs=kwargs, task_id=task_id, countdown=delay, headers=headers)
            except Exception:
                log.exception("the broker refused the copy of %s %s too: it is lost", self.name, task_id)
            return
        if order is not None:
            try:
                self._advance(order, inline=False)  # the main process: publish, never run tasks here
            except Exception:
                log.exception(
                    "%s %s: could not advance its key past the dead letter; key %r waits (docs/ordering.md)",
                    self.name, task_id, order.key,
                )  # fmt: skip

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

    def _done_not_recorded(self, cause: BaseException, effect: str, first: float) -> None:
        """The effect happened, its done record is missing: retry the record alone, within the budget."""
        key = self.request.id
        if self._may_retry(first):
            log.warning(
                "%s %s: the effect happened, its done record failed (%s: %s); only the record is retried",
                self.name, key, type(cause).__name__, cause,
            )  # fmt: skip
            raise self._hand_back(cause, first, **{EFFECT_DONE_HEADER: effect}) from cause
        log.error(
            "%s %s: the effect happened, but its done record could not be stored within "
            "TASK_RETRY_FOR_SECONDS (%s: %s); a later duplicate delivery would repeat the effect",
            self.name, key, type(cause).__name__, cause,
        )  # fmt: skip
        outcome(self.name, "done")  # the effect happened; only its record is missing
        order = request_order(self.request)
        if order is not None:
            try:
                self._advance(order)  # the effect happened: the key moves on
            except Exception:
                log.exception("%s %s: could not advance key %r (docs/ordering.md)", self.name, key, order.key)
        return None

    def _run_once(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        store = get_dedup_store()
        order = request_order(self.request)
        if order is not None and self._parked(order, key, args, kwargs):
            return None
        owner = lease_owner()
        claim = store.claim(key, owner)
        if claim is Claim.DONE:
            log.info("duplicate %s %s", self.name, key)
            outcome(self.name, "duplicate")
            self._advance(order)  # idempotent: a redelivered head may have died before it advanced
            return None
        if claim is Claim.BUSY:
            raise self._retry_while_leased(key, args, kwargs)
        recorded_effect = header(self.request, EFFECT_DONE_HEADER)
        if recorded_effect is not None:
            # An earlier delivery ran the body; only its done record is missing. Never run it again.
            self._mark_done(store, key, owner, str(recorded_effect))
            log.info("done record stored %s %s (the effect happened on an earlier delivery)", self.name, key)
            outcome(self.name, "done")
            self._advance(order)
            return None
        try:
            # A backfill event gets its document as it is now (changeflow.worker.backfill).
            result = self.run(*fresh_args(args), **kwargs)
        except Skip as skip:
            self._mark_done(store, key, owner, "skipped")
            log.info("skip %s %s: %s", self.name, key, skip)
            outcome(self.name, "skip")
            self._advance(order)
            return None
        except BaseException:
            self._release(store, key, owner)
            raise
        self._mark_done(store, key, owner, "ok")
        outcome(self.name, "done")
        # An error here is transient (Redis, the broker): the retry finds the key done and advances.
        self._advance(order)
        return result

    def _parked(self, order: Order, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Pass the key's gate, or park this message behind its head (True: parked, to be acked)."""
        found = OrderBook.of(get_dedup_store().client).gate(
            self.name,
            order,
            lambda: park_message(self.name, key, args, kwargs, order),
            # Run inline, its parked copy is all there is of it until it ends (a crash republishes it).
            keep_parked=getattr(self.request, _CHAIN_ATTR, None) is not None,
        )
        if found is Gate.PARKED:
            log.info("parked %s %s: an earlier task of key %s has not ended", self.name, key, order.key)
            return True
        return False

    def _advance(self, order: Order | None, *, inline: bool = True) -> None:
        """Move the key past this task; run the new head's parked message inline or publish it (before
        this one's ack)."""
        if order is None:
            return
        advanced = OrderBook.of(get_dedup_store().client).advance(self.name, order)
        if advanced.parked is None:
            return
        chain = getattr(self.request, _CHAIN_ATTR, None)
        if chain is not None:
            chain.next = advanced.parked  # run inline itself: the chain's driver goes on with it
            return
        if inline and not self.request.is_eager:
            self._run_chain(advanced.parked, order)
        else:
            self._republish(unpark_message(advanced.parked), order)

    def _run_chain(self, parked: bytes | None, order: Order) -> None:
        """Run the key's next parked tasks here, one after the other, within the chain's bounds; publish
        the one past them. Each runs through `_guard` as if delivered (gate, dedup, retries, dead letters).
        """
        settings = get_settings()
        started = getattr(self.request, _STARTED_ATTR, None) or time.monotonic()
        ran = 0
        while parked is not None:
            message = unpark_message(parked)
            if message.get("task") != self.name or not chain_may_run(
                ran,
                time.monotonic() - started,
                max_tasks=settings.ordered_chain_max_tasks,
                max_seconds=settings.ordered_chain_max_seconds,
                soft_time_limit=settings.task_soft_time_limit,
            ):
                self._republish(message, order)
                return
            ran += 1
            parked = self._run_inline(message)

    def _run_inline(self, message: dict[str, Any]) -> bytes | None:
        """Run a parked message as this process's current request; the next parked message it handed over."""
        parent = self.request
        chain = _Chain()
        task_id = message["id"]
        # A fresh context, not push_request (which copies the running request, custom headers such as
        # the effect-done one included): only where it runs is taken over, the rest is its own.
        self.request_stack.push(
            Context(
                id=task_id, args=list(message["args"]), kwargs=dict(message["kwargs"]),
                headers=dict(message["headers"]), retries=0, is_eager=False, called_directly=False,
                delivery_info=parent.delivery_info, hostname=parent.hostname, timelimit=parent.timelimit,
                ignore_result=parent.ignore_result, correlation_id=task_id, root_id=task_id,
                parent_id=parent.id, **{_CHAIN_ATTR: chain},
            )
        )  # fmt: skip
        log.info(
            "chained %s[%s] started: next of its key, run inline after %s", self.name, task_id, parent.id
        )
        outcome = "ended"
        try:
            self._guard(tuple(message["args"]), dict(message["kwargs"]))
        except Retry as retry:
            outcome = f"retry queued ({retry.humanize()})"  # it stays its key's head; the retry runs it
        except Reject as reject:
            # Its retry could not be published. Its parked copy is still stored: hand the running
            # message back (a transient error), whose next delivery hands the key over to it again.
            raise TransientTaskError(
                f"could not queue the retry of {task_id}, run inline: {reject.reason}"
            ) from reject
        except Ignore:
            outcome = "ignored"
        except Exception as exc:
            # Its dead letter is stored and its key advanced (else the guard raised Retry or Reject).
            outcome = f"failed ({type(exc).__name__}: {exc})"
        finally:
            self.pop_request()
        log.info("chained %s[%s] %s", self.name, task_id, outcome)
        return chain.next

    def _republish(self, parked: dict[str, Any], order: Order) -> None:
        """Publish a parked message again (same id and headers): its own delivery runs it."""
        try:
            self.apply_async(
                args=parked["args"], kwargs=parked["kwargs"], task_id=parked["id"], headers=parked["headers"]
            )
        except Exception as exc:
            # Not acked yet: the retry (or redelivery) finds this task done and advances again.
            raise TransientTaskError(
                f"could not publish {parked['id']}, next of key {order.key}: {exc}"
            ) from exc
        log.info("released %s %s: next of key %s", parked["task"], parked["id"], order.key)

    def _payload_order(self, args: tuple[Any, ...]) -> Order | None:
        """The order of a message from its payload and this task's `ordered_by` (no headers at hand)."""
        path = next(
            (r.ordered_by for r in getattr(self.app, "routes", ()) if self.name in r.tasks and r.ordered_by),
            None,
        )
        payload = args[0] if len(args) == 1 and isinstance(args[0], Mapping) else None
        if path is None or payload is None:
            return None
        from changeflow.listener.ordering import order_key

        key = order_key(payload, path)
        token = payload.get("_id")
        member = token.get("_data") if isinstance(token, Mapping) else None
        return Order(key, member) if key and isinstance(member, str) else None

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
        order: Order | None = None,
    ) -> None:
        """Store the dead letter; raises what MongoDB raised (the caller must not lose the task).

        An ordered task's dead letter says which later tasks of its key run past it.
        """
        payload = args[0] if len(args) == 1 and isinstance(args[0], Mapping) else {"args": args, **kwargs}
        extra = None
        if order is not None:
            members, count = OrderBook.of(get_dedup_store().client).pending(self.name, order)
            extra = {
                "ordering": {
                    "key": order.key,
                    "member": order.member,
                    "ran_past": [dedup_key({"_data": m}, self.name) for m in members],
                    "ran_past_members": members,
                    "ran_past_count": count,
                }
            }
        record_dead_letter(
            get_db(),
            task_name=self.name,
            task_id=task_id,
            payload=payload,
            error=error,
            traceback=trace,
            attempts=attempts,
            reason=reason,
            extra=extra,
        )
        dead_letter_stored(self.name, reason)


def _is_done(task_id: str) -> bool:
    try:
        return get_dedup_store().is_done(task_id)
    except Exception:
        log.warning("could not look up whether %s is done", task_id, exc_info=True)
        return False


def request_order(request: Any) -> Order | None:
    """The running message's order (its ordering headers), or None: an unordered task."""
    key, member = header(request, KEY_HEADER), header(request, MEMBER_HEADER)
    if isinstance(key, str) and isinstance(member, str) and key and member:
        return Order(key, member)
    return None


def park_message(task_name: str, task_id: str, args: Any, kwargs: Any, order: Order) -> bytes:
    """What a parked message keeps to be published again: name, id, arguments, ordering headers."""
    _, _, data = dumps(
        {
            "task": task_name,
            "id": task_id,
            "args": list(args),
            "kwargs": dict(kwargs),
            "headers": order_headers(order),
        },
        serializer="json",  # kombu's, with the BSON types registered: the payload's types survive
    )
    return data.encode("utf-8") if isinstance(data, str) else data


def unpark_message(data: bytes) -> dict[str, Any]:
    message: dict[str, Any] = loads(data, "application/json", "utf-8")
    return message


_owner_prefix: tuple[int, str] = (0, "")  # (pid, "host:pid:random"): made once per process
_owner_count = itertools.count()


def lease_owner() -> str:
    """A token naming one delivery: host, process, a random part made once per process, a counter."""
    global _owner_prefix
    if _owner_prefix[0] != os.getpid():  # the first use, or a forked child: a prefix of its own
        pid = os.getpid()
        _owner_prefix = (pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex}")
    return f"{_owner_prefix[1]}:{next(_owner_count)}"


def current_key() -> str:
    """The dedup key of the task running now (its task id): for Message-IDs and markers."""
    task = current_task
    key = getattr(getattr(task, "request", None), "id", None)
    if not key:
        raise RuntimeError("current_key() is only available inside a running changeflow task")
    return str(key)
