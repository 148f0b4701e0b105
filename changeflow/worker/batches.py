"""Batched tasks: one Celery task runs a list of events, each event still behind its own dedup key.

    @app.on("orders", "update", batch=100)
    def update_analytics(events): ...          # a list of change events, at most 100

Where the events are grouped: in the listener. It already holds a batch of events between two
publishes (changeflow/listener/stream.py); for a batched task, changeflow/listener/batching.py sends
the task's events of that publish as messages of at most `batch` events each (args: `[[event, ...]]`)
instead of one message per event. Nothing waits for a batch to fill: a quiet stream sends batches of
one, a busy one fuller batches, so batching adds no latency of its own.

Why not celery-batches (a worker-side buffer of single messages): it needs the worker to prefetch at
least `flush_every` messages (`worker_prefetch_multiplier` 0 or large), while changeflow's workers run
with acks-late and a prefetch of one so that a dying worker holds no extra messages
(changeflow/worker/app.py). A buffer of prefetched messages would also wait up to its flush interval
on a quiet stream, and every buffered message would still cost a broker message and a task event.
With the listener grouping, the worker configuration stays as it is: a batch is one message, acked
after it ran (at-least-once), redelivered whole if its worker dies; Flower shows one task per batch
(its argsrepr: the count and the first event).

The guard per event (BatchTask): the dedup key of each event is `dedup_key(event["_id"], task name)`,
the id its single message would have had, so a replay, a backfill or a single-event message of the
same event finds the same key.

    done already             -> not given to the handler (outcome "duplicate")
    lease held elsewhere     -> sent again later in a copy holding those events (no retry used up)
    handler returns          -> every event given is done ("ok"), except those it reports failed
    handler reports failures -> it returns {position in the list: exception}; per event: Skip ->
                                done "skipped"; a transient error -> retried; anything else -> dead
                                letter "permanent" with that event's payload, key and error
    handler raises transient -> every event given is retried (the whole list again, done ones skipped)
    handler raises otherwise -> the events are run again one by one (a list of one each) to find
                                the one that fails: only it is dead-lettered, the others are done.
                                The handler must therefore be idempotent per event (a batch that
                                failed half way runs its events again)
    retry                    -> the batch's message is retried (same id, backoff, time budget of
                                TASK_RETRY_FOR_SECONDS counted from the first attempt) with only the
                                events not done; past the budget they are dead-lettered
                                "retries_exhausted"
    dead letter refused      -> (MongoDB down) the event goes into the retry, never acked and lost
    done records refused     -> the effect happened: the retry carries their keys in a header and the
                                next delivery only records them done (as the single guard does)
    hard time limit kill     -> every event of the message not done is dead-lettered "permanent"

A batch whose events were partly dead-lettered ends as FAILURE (BatchEventsFailed names them), so
Flower shows it; the done events are done. Ordered tasks (`ordered_by`) cannot be batched.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Task, current_task
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded

from changeflow.worker.backfill import fresh_args
from changeflow.worker.dedup import Claim, DedupStore, get_dedup_store
from changeflow.worker.errors import Skip, is_transient
from changeflow.worker.idempotent import (
    EFFECT_DONE_HEADER,
    FIRST_ATTEMPT_HEADER,
    IdempotentTask,
    first_attempt_at,
    header,
)
from changeflow.worker.keys import dedup_key
from changeflow.worker.metrics import outcome
from changeflow.worker.retry import lease_retry_delay, retry_delay
from changeflow.worker.settings import get_settings

log = logging.getLogger(__name__)

# The largest `batch=` accepted: a batch is one message, one transaction-sized unit of work and one
# done-record round trip; beyond this a message grows past what a worker should hold in one task.
MAX_BATCH = 10_000
# The keys of a retried batch's events whose effect happened but whose done record failed.
EFFECT_DONE_KEYS_HEADER = "changeflow_batch_effect_done"


class BatchEventsFailed(Exception):
    """Some events of a batch were dead-lettered (the others are done): the task ends as FAILURE."""


def check_batch_size(task_name: str, batch: object) -> int:
    """The `batch=` of `@app.on` as an int in 1..MAX_BATCH, or ValueError naming the task."""
    if isinstance(batch, bool) or not isinstance(batch, int):
        raise ValueError(f"task {task_name!r}: batch= must be an int (events per task), got {batch!r}")
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"task {task_name!r}: batch= must be between 1 and {MAX_BATCH}, got {batch}")
    return batch


def batch_size(task: object) -> int | None:
    """The batch size of a batched task, None for any other task."""
    return task.batch_size if isinstance(task, BatchTask) else None


def batch_id(keys: Sequence[str]) -> str:
    """The task id of a batch message: derived from its events' keys (stable when published again)."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "changeflow.batch\n" + "\n".join(keys)))


def event_key(event: Mapping[str, Any], task_name: str | None = None) -> str:
    """The dedup key of one event of a batch: its marker in an idempotent effect (as current_key()).

    `task_name` defaults to the task running now.
    """
    if task_name is None:
        task_name = getattr(current_task, "name", None)
        if not task_name:
            raise RuntimeError("event_key() without a task name is only available inside a running task")
    return dedup_key(event["_id"], task_name)


@dataclass
class Item:
    """One event of the running batch and what became of it."""

    key: str
    event: Mapping[str, Any]
    error: BaseException | None = None
    trace: str | None = None


@dataclass
class Outcomes:
    """The events of one delivery, sorted by what is left to do for them."""

    done: list[tuple[Item, str]] = field(default_factory=list)  # run (or skipped): to be marked done
    retry: list[Item] = field(default_factory=list)  # transient failure: in the retry
    dead: list[Item] = field(default_factory=list)  # to dead-letter "permanent"


def items_of(args: tuple[Any, ...], task_id: str, task_name: str) -> list[Item]:
    """The events of a message: `[[event, ...]]` (a batch) or `[event]` (one event, id = its key).

    ValueError for anything else (the message is then dead-lettered as a whole).
    """
    if len(args) != 1:
        raise ValueError(f"a batched task takes one argument (a list of events), got {len(args)}")
    (payload,) = args
    if isinstance(payload, Mapping):
        return [Item(task_id, payload)]  # a single-event message: a replay, a backfill, an old message
    if not isinstance(payload, list | tuple):
        raise ValueError(f"a batched task takes a list of events, got {type(payload).__name__}")
    items = []
    for position, event in enumerate(payload):
        if not isinstance(event, Mapping) or not isinstance(event.get("_id"), Mapping):
            raise ValueError(f"event {position} of the batch is not a change event with an _id")
        items.append(Item(dedup_key(event["_id"], task_name), event))
    return items


def failures_of(returned: object, count: int) -> dict[int, BaseException]:
    """The handler's report of failed events: None (all done) or {position: exception}.

    TypeError for anything else: a handler that reports something the guard cannot read.
    """
    if returned is None:
        return {}
    if not isinstance(returned, Mapping):
        raise TypeError(
            f"a batched task returns None or {{position: exception}} for failed events, got {returned!r}"
        )
    failures: dict[int, BaseException] = {}
    for position, exc in returned.items():
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < count:
            raise TypeError(f"failed event position {position!r} is not in 0..{count - 1}")
        if not isinstance(exc, BaseException):
            raise TypeError(f"the failure of event {position} is {exc!r}, not an exception")
        failures[position] = exc
    return failures


def sort_outcome(item: Item, outcomes: Outcomes) -> None:
    """Put an item whose handler run ended (item.error set or not) where its outcome belongs."""
    if item.error is None:
        outcomes.done.append((item, "ok"))
    elif isinstance(item.error, Skip):
        outcomes.done.append((item, "skipped"))
    elif is_transient(item.error):
        outcomes.retry.append(item)
    else:
        outcomes.dead.append(item)


class BatchTask(IdempotentTask):
    """The guard of a batched task (module docstring); `batch_size` is set by `@app.on(batch=N)`."""

    batch_size: int = 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            return Task.__call__(self, *args, **kwargs)  # a plain call: no keys, no guard
        first = first_attempt_at(request, time.time())
        try:
            items = items_of(args, request.id, self.name)
        except ValueError as exc:
            # Not events at all (no key to keep them apart by): the message is one dead letter.
            error = f"{type(exc).__name__}: {exc}"
            try:
                self._dead_letter(request.id, args, kwargs, error, None, request.retries + 1, "permanent")
            except Exception as refused:
                log.exception("could not record the dead letter of %s %s", self.name, request.id)
                raise self._hand_back(refused, first) from exc  # runs again; never acked and lost
            raise
        return self._run_batch(items, kwargs, first)

    def _run_batch(self, items: list[Item], kwargs: dict[str, Any], first: float) -> None:
        store = get_dedup_store()
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        try:
            claims = claim_all(store, [item.key for item in items], owner)
        except Exception as exc:
            if is_transient(exc) and self._may_retry(first):
                raise self._hand_back_events(exc, first, items) from exc
            raise
        recorded = set(header(self.request, EFFECT_DONE_KEYS_HEADER) or ())
        if header(self.request, EFFECT_DONE_HEADER) is not None:
            recorded.update(item.key for item in items)  # a single-event message of the single guard
        outcomes = Outcomes()
        busy: list[Item] = []
        to_run: list[Item] = []
        for item, claim in zip(items, claims, strict=True):
            if claim is Claim.DONE:
                log.info("duplicate %s %s", self.name, item.key)
                outcome(self.name, "duplicate")
            elif claim is Claim.BUSY:
                busy.append(item)
            elif item.key in recorded:
                outcomes.done.append((item, "ok"))  # ran on an earlier delivery: record it only
            else:
                to_run.append(item)
        if to_run:
            try:
                self._run_handler(to_run, kwargs)
            except BaseException:
                release_all(store, [item.key for item in to_run], owner)
                raise
            for item in to_run:
                sort_outcome(item, outcomes)
        self._finish(store, owner, outcomes, busy, first)

    def _run_handler(self, items: list[Item], kwargs: dict[str, Any]) -> None:
        """Run the handler on `items`, setting each item's error (None: its effect happened)."""
        events: list[Any] = []
        running: list[Item] = []
        for item in items:
            try:
                events.append(fresh_args((item.event,))[0])  # a backfill event: its document now
                running.append(item)
            except Exception as exc:
                item.error, item.trace = exc, traceback.format_exc()
        if not running:
            return
        try:
            failures = failures_of(self.run(events, **kwargs), len(events))
        except (Retry, Ignore, Reject):
            raise
        except Exception as exc:
            trace = traceback.format_exc()
            if len(running) == 1 or is_transient(exc):
                for item in running:
                    item.error, item.trace = exc, trace
                return
            log.warning(
                "%s: a batch of %d events failed (%s: %s); running them one by one",
                self.name, len(running), type(exc).__name__, exc,
            )  # fmt: skip
            for item in running:
                self._run_handler([item], kwargs)
            return
        for position, exc in failures.items():
            item = running[position]
            item.error = exc
            item.trace = "".join(traceback.format_exception(exc)) if exc.__traceback__ else None

    def _finish(
        self, store: DedupStore, owner: str, outcomes: Outcomes, busy: list[Item], first: float
    ) -> None:
        """Record the done events, dead-letter the failed ones, send the rest again; in that order."""
        request = self.request
        leftover: list[Item] = []  # sent again in the retry
        effect_done: list[str] = []  # of the leftover: only their done record is missing
        release_all(store, [item.key for item in outcomes.retry + outcomes.dead], owner)
        if outcomes.done:
            try:
                mark_all_done(store, [(item.key, result) for item, result in outcomes.done], owner)
            except Exception as exc:
                log.warning(
                    "%s: the effect of %d events happened, their done records failed (%s: %s)",
                    self.name, len(outcomes.done), type(exc).__name__, exc,
                )  # fmt: skip
                leftover += [item for item, _ in outcomes.done]
                effect_done += [item.key for item, _ in outcomes.done]
                for item, _ in outcomes.done:
                    item.error = exc
            else:
                for item, result in outcomes.done:
                    if result == "skipped":
                        log.info("skip %s %s: %s", self.name, item.key, item.error)
                    outcome(self.name, "skip" if result == "skipped" else "done")
        retry_allowed = self._may_retry(first)
        dead = [(item, "permanent") for item in outcomes.dead]
        if retry_allowed:
            leftover += outcomes.retry
        else:
            dead += [(item, "retries_exhausted") for item in outcomes.retry]
        lettered: list[Item] = []
        for item, reason in dead:
            assert item.error is not None
            error = f"{type(item.error).__name__}: {item.error}"
            try:
                self._dead_letter(item.key, (item.event,), {}, error, item.trace, request.retries + 1, reason)
                lettered.append(item)
            except Exception:
                log.exception(
                    "could not record the dead letter of %s %s (%s: %s); it runs again later",
                    self.name, item.key, reason, error,
                )  # fmt: skip
                leftover.append(item)
        if busy:
            self._send_busy(busy)
        if leftover:
            if not retry_allowed and set(effect_done) == {item.key for item in leftover}:
                log.error(
                    "%s: the effect of %s happened, but their done records could not be stored within "
                    "TASK_RETRY_FOR_SECONDS; a later duplicate delivery would repeat them",
                    self.name, ", ".join(effect_done),
                )  # fmt: skip
                for _ in effect_done:
                    outcome(self.name, "done")
            else:
                cause = next((item.error for item in leftover if item.error is not None), None)
                raise self._hand_back_events(cause, first, leftover, effect_done)
        if lettered:
            names = ", ".join(f"{item.key} ({type(item.error).__name__})" for item in lettered)
            raise BatchEventsFailed(f"{len(lettered)} of the batch's events were dead-lettered: {names}")

    def _hand_back_events(
        self,
        exc: BaseException | None,
        first: float,
        items: list[Item],
        effect_done: Sequence[str] = (),
    ) -> Retry:
        """Retry the message with only `items` (same id, backoff, first-attempt time kept)."""
        request = self.request
        delay = retry_delay(request.retries, get_settings().retry_backoff_max)
        kept = {
            **(request.headers or {}),
            FIRST_ATTEMPT_HEADER: first,
            EFFECT_DONE_KEYS_HEADER: list(effect_done),
        }
        kept.pop(EFFECT_DONE_HEADER, None)  # folded into the keys' header
        events = [dict(item.event) for item in items]
        try:
            return self.retry(
                args=[events],
                exc=exc,
                countdown=delay,
                throw=False,
                headers=kept,  # type: ignore[arg-type]
            )
        except Reject as reject:
            raise Reject(reject.reason, requeue=True) from exc  # the broker is down too: hand it back

    def _send_busy(self, items: list[Item]) -> None:
        """Events another delivery is running: a copy with them, later, its retry count unchanged."""
        request = self.request
        delay = lease_retry_delay()
        log.info(
            "lease busy %s: %d events of the batch are running elsewhere, sent again in %.1fs",
            self.name, len(items), delay,
        )  # fmt: skip
        if request.is_eager:
            return  # under apply() nothing would run the copy: the other delivery finishes them
        events = [dict(item.event) for item in items]
        self.apply_async(
            args=[events],
            task_id=batch_id([item.key for item in items]),
            countdown=delay,
            retries=request.retries,
            headers={FIRST_ATTEMPT_HEADER: first_attempt_at(request, time.time())},
        )  # an error propagates: the message is not acked, its redelivery finds them again

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # The hard time limit killed the pool process: every event of the message not done is a
        # dead letter (the single guard's handling, one event at a time).
        if not isinstance(exc, TimeLimitExceeded):
            return
        try:
            items = items_of(tuple(args or ()), task_id, self.name)
        except ValueError:
            super().on_failure(exc, task_id, args, kwargs, einfo)
            return
        store = get_dedup_store()
        for item in items:
            try:
                done = store.is_done(item.key)
            except Exception:
                done = False
            if not done:
                super().on_failure(exc, item.key, [dict(item.event)], kwargs or {}, einfo)


def claim_all(store: DedupStore, keys: Sequence[str], owner: str) -> list[Claim]:
    """`store.claim` for every key, in one pipelined round trip."""
    pipe = store.client.pipeline(transaction=False)
    for key in keys:
        store._claim(keys=[store.done_key(key), store.lease_key(key)], args=[owner, store.lease_ttl_ms],
                     client=pipe)  # fmt: skip
    return [Claim(int(found)) for found in pipe.execute()]


def mark_all_done(store: DedupStore, results: Sequence[tuple[str, str]], owner: str) -> None:
    """`store.mark_done(key, owner, outcome)` for every (key, outcome), in one round trip."""
    pipe = store.client.pipeline(transaction=False)
    for key, result in results:
        store._mark_done(
            keys=[store.done_key(key), store.lease_key(key)],
            args=[owner, result, store.done_ttl_seconds],
            client=pipe,
        )
    pipe.execute()


def release_all(store: DedupStore, keys: Sequence[str], owner: str) -> None:
    """Release `owner`'s leases on `keys` (one round trip); a failure only leaves them to expire."""
    if not keys:
        return
    try:
        pipe = store.client.pipeline(transaction=False)
        for key in keys:
            store._release(keys=[store.lease_key(key)], args=[owner], client=pipe)
        pipe.execute()
    except Exception:
        log.warning("could not release %d leases; they will expire", len(keys), exc_info=True)
