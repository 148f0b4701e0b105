"""The watch loop: change stream -> batches of task messages -> broker -> checkpoint.

One database-level change stream, filtered server-side by the routes' `$match`. Each turn of the
loop collects a batch of events, publishes their task messages, dead-letters the messages the
serializer refuses, and only then may move the checkpoint (at most once per
LISTENER_CHECKPOINT_INTERVAL_MS while events flow). So after any crash, a restart resumes at or
before the first event whose tasks are not in the broker: events are never lost, and an event
published twice carries the same task ids both times (the workers' dedup guard drops the copy).

Failures:
- MongoDB unreachable or a resumable server error: reopen the stream from the last position, after
  an exponential, capped, jittered backoff.
- Broker unavailable: keep the batch, back off, publish it again; the checkpoint waits.
- ChangeStreamHistoryLost (code 286: the checkpoint fell off the oplog): record the gap in
  `changeflow_gaps` (changeflow/listener/gaps.py), then exit 3 (on_history_lost "fail") or, only when told
  ("resume-now"), log it at WARNING and continue from now. Never a silent skip, never a retry loop.
- MongoDB refusing the listener's credentials (AuthenticationFailed, 18) or their rights (Unauthorized,
  13): no retry can succeed until an operator fixes MONGODB_URI or the user's roles, so the listener
  stops with the exit code of configuration errors (2), saying so in one line (URI masked).
- Another non-resumable error: stop with a distinct exit code.
- Pre-images (routes with `pre_images=True`): enabled on their collections when the listener becomes
  active, and asked of the stream (changeflow/listener/pre_images.py); MongoDB refusing the collMod
  stops the listener with exit code 2, naming the collection and the command.
- Backpressure (`backpressure`, changeflow/listener/backpressure.py): while the broker's queue holds
  LISTENER_MAX_QUEUE_LENGTH messages or more, the loop reads nothing (the checkpoint stays before the
  unread events) and looks again with a growing wait, renewing its lease and heartbeat, until the
  queue is below 90 % of the bound.
- Invalidate (the watched database was dropped): log it and reopen after the invalidation.
- A change event over 16 MB comes split ($changeStreamSplitLargeEvent, the pipeline's last stage when
  the server has it) and is reassembled before routing (changeflow/listener/fragments.py); the position never
  stops inside it.

Failover (with a `lease`, changeflow/listener/lease.py): only the lease holder runs the stream; it claims the
checkpoint with its epoch before loading it, renews the lease from this loop (never from a thread:
a blocked loop must lose the lease), checks it before each publish, and fences every checkpoint save
with its epoch. LeaseLost or FencedOut: stop publishing, drop the batch in memory (it is behind the
checkpoint), go back to standby. The heartbeat file (health.py) is written from the loop too.

The stream is always opened with `start_after=<token>` rather than `resume_after`: for an ordinary
token the two are the same, but only startAfter accepts an invalidate token, and a stream can end on
one without showing the event (the routes' $match filters invalidate events out; the server then
just closes the cursor, its last postBatchResumeToken being the invalidate's).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from pymongo.change_stream import ChangeStream
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from changeflow.listener import pre_images
from changeflow.listener.backoff import Backoff
from changeflow.listener.backpressure import Backpressure, next_wait
from changeflow.listener.checkpoints import CheckpointStore, FencedOut, ResumeToken
from changeflow.listener.exit_codes import EXIT_FATAL, EXIT_HISTORY_LOST, EXIT_OK, EXIT_USAGE
from changeflow.listener.fragments import SPLIT_STAGE, FragmentError, Reassembler, server_splits_large_events
from changeflow.listener.gaps import COLLECTION as GAPS_COLLECTION
from changeflow.listener.gaps import GapEnd, GapStore, late_inserts
from changeflow.listener.health import HealthFile
from changeflow.listener.lease import Lease, LeaseLost, server_clock
from changeflow.listener.metrics import ListenerMetrics, event_time
from changeflow.listener.pre_images import PreImagesRefused
from changeflow.listener.publish import (
    BrokerUnavailable,
    Message,
    Publisher,
    Rejected,
    messages_for,
    record_unpublishable,
)
from changeflow.listener.routes import Route, compile_match
from changeflow.worker.settings import Settings, get_settings, mask_url

log = logging.getLogger(__name__)

HISTORY_LOST = 286  # ChangeStreamHistoryLost
HISTORY_LOST_MODES = ("fail", "resume-now")
# Server errors after which reopening the stream is expected to work: the change streams spec's
# resumable codes (for servers that do not label them), CursorNotFound, and WriteConcernFailed (64)
# for the checkpoint and dead-letter writes.
RESUMABLE_CODES = frozenset(
    {6, 7, 43, 63, 64, 89, 91, 133, 150, 189, 234, 262, 9001, 10107, 11600, 11602, 13388, 13435, 13436}
)

# MongoDB refused the credentials (AuthenticationFailed) or what they may do (Unauthorized).
ACCESS_DENIED_CODES = frozenset({13, 18})


class AccessDenied(Exception):
    """MongoDB refused the listener's credentials or their rights: a configuration error."""


def is_access_denied(exc: BaseException) -> bool:
    return isinstance(exc, OperationFailure) and exc.code in ACCESS_DENIED_CODES


def buffered_events(stream: ChangeStream[Any]) -> int:
    """How many events pymongo holds for `stream` already, readable without a getMore.

    pymongo has no public API for this, so it reads the command cursor's buffer; should that change
    in a later pymongo, the answer is "unknown" (1), and batches fill up to max-await time as before.
    """
    buffer = getattr(getattr(stream, "_cursor", None), "_data", None)
    return len(buffer) if buffer is not None else 1


def is_resumable(exc: PyMongoError) -> bool:
    """Whether reopening the stream after `exc` can succeed (else the listener must stop)."""
    if isinstance(exc, ConnectionFailure):
        return True  # network errors, server selection timeouts, not-primary after a failover
    if not isinstance(exc, OperationFailure):
        return False
    if exc.code == HISTORY_LOST or exc.has_error_label("NonResumableChangeStreamError"):
        return False
    labels = ("ResumableChangeStreamError", "RetryableWriteError")
    return any(exc.has_error_label(label) for label in labels) or exc.code in RESUMABLE_CODES


@dataclass
class Batch:
    """Events read from the stream whose messages are not all delivered yet.

    Delivery drains it step by step (publish, then dead letters, then checkpoint), so a retry after a
    failure redoes only the steps that did not finish.
    """

    events: int
    messages: list[Message]
    token: ResumeToken | None  # the checkpoint once the batch is delivered
    time: datetime | None = None  # the time of that position (the last event's wallTime)
    rejected: list[Rejected] = field(default_factory=list)
    late: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # gap id -> inserts to note


@dataclass
class Stats:
    events: int = 0
    tasks: int = 0
    dead_letters: int = 0
    checkpoint: ResumeToken | None = None


class Listener:
    """Follows the change stream of one database and turns routed events into Celery tasks.

    Collaborators are passed in so tests can drive the loop: the database to watch (`db`), the
    `publisher`, the `checkpoints` store, the `routes`, the `settings`, and `dead_letter`, called for
    each message the serializer refused. Optional: `lease` (failover: only the lease holder runs,
    checkpoint saves are fenced with its epoch), `health` (the heartbeat file), `gaps` (where lost
    history is recorded; default `changeflow_gaps` in `db`), `on_history_lost` ("fail" or
    "resume-now"; default LISTENER_ON_HISTORY_LOST), `backpressure` (the broker queue's bound).
    """

    def __init__(
        self,
        db: Database,
        publisher: Publisher,
        checkpoints: CheckpointStore | None = None,
        routes: Sequence[Route] = (),
        settings: Settings | None = None,
        *,
        dead_letter: Callable[[Rejected], None] | None = None,
        backoff: Backoff | None = None,
        idle_checkpoint_seconds: float = 5.0,
        summary_seconds: float = 60.0,
        lease: Lease | None = None,
        health: HealthFile | None = None,
        gaps: GapStore | None = None,
        on_history_lost: str | None = None,
        backpressure: Backpressure | None = None,
        metrics: ListenerMetrics | None = None,
    ) -> None:
        settings = settings or get_settings()
        if settings.listener_batch_size < 1:
            raise ValueError("LISTENER_BATCH_SIZE must be at least 1")
        on_history_lost = on_history_lost or settings.listener_on_history_lost
        if on_history_lost not in HISTORY_LOST_MODES:
            raise ValueError(f"on_history_lost must be one of {HISTORY_LOST_MODES}, got {on_history_lost!r}")
        self.db = db
        self.publisher = publisher
        self.checkpoints = checkpoints or CheckpointStore(db)
        self.routes = tuple(routes)
        self.settings = settings
        self.dead_letter = dead_letter or partial(record_unpublishable, db)
        self.backoff = backoff or Backoff()
        self.idle_checkpoint_seconds = idle_checkpoint_seconds
        self.summary_seconds = summary_seconds
        self.lease = lease
        self.health = health
        self.gaps = gaps
        self.on_history_lost = on_history_lost
        self.backpressure = backpressure
        self.stream_name = self.settings.listener_stream_name
        self.metrics = metrics or ListenerMetrics(self.stream_name)
        self.metrics.holds_lease(lambda: self.lease.held if self.lease is not None else self.ready.is_set())
        self.pipeline = [{"$match": compile_match(self.routes)}]  # fails early on an empty route table
        # Collections whose routes need pre-images: enabled once active, then asked of the stream.
        self.pre_image_collections = pre_images.collections_needing_pre_images(self.routes)
        self._pre_images_enabled = not self.pre_image_collections
        self.stats = Stats()
        # Set while the stream is open (and a starting checkpoint saved) in the active role: from
        # then on, every change is delivered. Cleared when a lease is lost.
        self.ready = threading.Event()
        self._stopping = threading.Event()
        # Where to reopen the stream: after every event that is delivered or held in _pending; and
        # the time of that position (None when unknown).
        self._position: ResumeToken | None = None
        self._position_time: datetime | None = None
        self._time_source = "position_time"
        self._pending: Batch | None = None
        self._saved: ResumeToken | None = None
        self._saved_at = 0.0
        self._unsaved_events = False  # events delivered since the last checkpoint save
        self._summary_at = 0.0
        self._open_gap: str | None = None  # a gap whose end is the next opened stream's start
        # Resumed gaps not reconciled yet: inserts created inside their windows are noted when
        # delivered, so reconcile leaves them out even once the gap's end is gone from the oplog.
        self._gap_ends: list[GapEnd] = []
        self._insert_routes: dict[str, list[str]] = {}
        for route in self.routes:
            if "insert" in route.operation_types:
                fields = self._insert_routes.setdefault(route.collection, [])
                if route.changed_at and route.changed_at not in fields:
                    fields.append(route.changed_at)
        self._fragments = Reassembler()  # a split event (over 16 MB) being read (fragments.py)
        self._splits: bool | None = None  # the server has $changeStreamSplitLargeEvent (None: not asked)
        self._standby_seen: tuple[str, int] | None = None

    def stop(self) -> None:
        """Finish the batch in flight (publish + checkpoint), then make run() return. Signal-safe."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def role(self) -> str:
        if self.lease is not None and not self.lease.held:
            return "standby"
        return "active" if self.ready.is_set() else "starting"

    def run(self) -> int:
        """Follow the stream until stop() or a fatal error; returns the process exit code.

        With a lease: wait as a standby until the lease is free, run while holding it, and go back
        to standby when it is lost (another listener took over, or a checkpoint save was fenced out).
        """
        self._summary_at = time.monotonic()
        self._beat()
        try:
            while not self.stopping:
                if self.lease is not None and not self.lease.held and not self._try_become_active():
                    continue
                try:
                    return self._run_active()
                except (LeaseLost, FencedOut) as exc:
                    self._step_down(exc)
            log.info("listener stopped (was %s)", self.role)
            return EXIT_OK
        except (AccessDenied, PreImagesRefused) as exc:
            log.error("%s; exiting with code %d", exc, EXIT_USAGE)
            return EXIT_USAGE
        finally:
            self._release()

    # -- roles ------------------------------------------------------------------------------------
    def _try_become_active(self) -> bool:
        assert self.lease is not None
        try:
            acquired = self.lease.try_acquire()
        except PyMongoError as exc:
            self._wait(exc, "MongoDB error while acquiring the lease of stream %s", self.stream_name)
            return False
        if acquired:
            self._standby_seen = None
            lease = self.lease
            log.info("active for stream %s (epoch %d, owner %s)", self.stream_name, lease.epoch, lease.owner)
            self._beat()
            return True
        holder = self.lease.holder
        seen = (holder.owner, holder.epoch) if holder else ("?", 0)
        if seen != self._standby_seen:
            self._standby_seen = seen
            log.info(
                "listener standby: stream %s is held by %s (epoch %d, lease expires %s); polling every %.1fs",
                self.stream_name, seen[0], seen[1],
                holder.expires_at.isoformat() if holder and holder.expires_at else "?",
                self.lease.poll_seconds,
            )  # fmt: skip
        self._beat()
        self._stopping.wait(self.lease.poll_seconds)
        return False

    def _step_down(self, exc: Exception) -> None:
        log.error(
            "%s on stream %s: %s; stopped publishing, going back to standby",
            "fenced out" if isinstance(exc, FencedOut) else "lease lost", self.stream_name, exc,
        )  # fmt: skip
        if self.lease is not None:
            self.lease.forget()
        # Unpublished events stay behind the checkpoint: the new leader reads them again.
        self._pending = None
        self.ready.clear()
        self._beat()

    def _release(self) -> None:
        if self.lease is not None and self.lease.held:
            try:
                self.lease.release()
            except PyMongoError as exc:  # it expires on its own after the TTL
                log.warning("could not release the lease of stream %s: %s", self.stream_name, exc)
        self.ready.clear()
        if self.health is not None:
            self.health.heartbeat("stopped")

    def _keep_lease(self) -> None:
        """Renew the lease when due; LeaseLost when another listener holds it now."""
        if self.lease is not None:
            self.lease.renew_if_due()

    def _beat(self) -> None:
        if self.health is not None:
            self.health.heartbeat(self.role, self.lease.epoch if self.lease is not None else None)

    # -- the active role --------------------------------------------------------------------------
    def _run_active(self) -> int:
        loaded = False
        while not self.stopping:
            try:
                self._keep_lease()  # before anything is published: a stalled process finds out here
                if not loaded:  # inside the loop: MongoDB may be unreachable at start, too
                    self._enable_pre_images()
                    self._load_checkpoint()
                    loaded = True
                self._deliver_pending()  # a batch left over from a broker outage goes first
                opening = datetime.now(UTC)
                with self._open() as stream:
                    self._on_open(stream, opening)
                    self._follow(stream)
            except BrokerUnavailable as exc:
                self._wait(exc, "broker unavailable, holding %d unpublished tasks", self._pending_tasks())
            except FragmentError as exc:  # not from a conforming server; reading it again may mend it
                self._wait(exc, "broken split event on stream %s, reading it again", self.stream_name)
            except PyMongoError as exc:
                self._refuse_if_denied(exc)
                if isinstance(exc, OperationFailure) and exc.code == HISTORY_LOST:
                    code = self._history_lost(exc)
                    if code is not None:
                        return code
                    continue
                if not is_resumable(exc):
                    log.error("non-resumable MongoDB error on stream %s, exiting: %r", self.stream_name, exc)
                    return EXIT_FATAL
                self._wait(exc, "MongoDB error on stream %s", self.stream_name)
        return self._finish() if loaded else EXIT_OK

    def _load_checkpoint(self) -> None:
        if self.lease is not None and self.lease.epoch is not None:
            # From now on a former leader's saves are refused (FencedOut), before we read the position.
            self.checkpoints.claim(self.stream_name, self.lease.epoch)
        record = self.checkpoints.load_record(self.stream_name)
        self._saved = self._position = record.token if record is not None else None
        self._saved_at = time.monotonic()  # the loaded checkpoint counts as just saved
        self._unsaved_events = False
        self._position_time, self._time_source = None, "position_time"
        if record is not None and record.token is not None:
            if record.position_time is not None:
                self._position_time = record.position_time
            elif record.updated_at is not None:  # saved before position_time existed: later than the position
                self._position_time, self._time_source = record.updated_at, "updated_at"
            else:
                self._time_source = "unknown"
        self.stats.checkpoint = self._saved
        self.metrics.checkpoint(self._position_time if self._saved is not None else None)
        if self._insert_routes:
            self._gap_ends = self._gap_store().ends(self.stream_name)
        if self._saved is None:
            log.info("no checkpoint for stream %s: starting now", self.stream_name)
        else:
            log.info("resuming stream %s after checkpoint %s", self.stream_name, _show(self._saved))

    def _enable_pre_images(self) -> None:
        """collMod the collections whose routes need pre-images (once per process; pre_images.py)."""
        if self._pre_images_enabled:
            return
        pre_images.enable(self.db, self.pre_image_collections, is_resumable)  # PreImagesRefused: exit 2
        self._pre_images_enabled = True

    def _open(self) -> ChangeStream[Any]:
        self._fragments.reset()  # the stream starts before any event it holds a part of
        before: dict[str, Any] = {}
        if self.pre_image_collections:
            before["full_document_before_change"] = pre_images.STREAM_OPTION
        return self.db.watch(
            self._watch_pipeline(),
            **before,
            full_document="updateLookup",
            start_after=self._position,  # None: start now (see the module docstring for why not resume_after)
            max_await_time_ms=self.settings.listener_max_await_ms,
            batch_size=self.settings.listener_batch_size,
        )

    def _watch_pipeline(self) -> list[dict[str, Any]]:
        """The routes' $match, then $changeStreamSplitLargeEvent (always last) if the server has it.

        Asked at every open: the server may have been upgraded, or a failover may have changed it.
        """
        splits = server_splits_large_events(self.db)
        if splits != self._splits:
            self._splits = splits
            if splits:
                log.info("events over 16 MB come split ($changeStreamSplitLargeEvent) and are reassembled")
            else:
                log.warning(
                    "this MongoDB has no $changeStreamSplitLargeEvent (it needs 6.0.9 or 7.0+): a change "
                    "event over 16 MB will stop the listener with BSONObjectTooLarge (10334)"
                )
        return [*self.pipeline, SPLIT_STAGE] if splits else list(self.pipeline)

    def _on_open(self, stream: ChangeStream[Any], opening: datetime) -> None:
        if self._open_gap is not None:
            # Resumed from now after lost history: the gap ends where this stream starts.
            self._gap_store().resumed(self._open_gap, self._server_now(), stream.resume_token)
            if self._insert_routes:
                self._gap_ends = self._gap_store().ends(self.stream_name)
            log.warning(
                "gap %s on stream %s ends at %s: the stream continues from there",
                self._open_gap, self.stream_name, _show(stream.resume_token),
            )  # fmt: skip
            self._open_gap = None
        if self._position is None:
            self._advance(stream.resume_token, opening)  # "now" is no earlier than the moment we asked
        else:
            self._advance(stream.resume_token, self._position_time)
        if self._saved is None:
            # First start ever: make "now" durable at once, so a crash before the first event still
            # resumes here instead of at a later "now".
            self._checkpoint(self._position, self._position_time)
        self.metrics.opened(self._position_time)
        if not self.ready.is_set():
            self.ready.set()
            self._beat()
            log.info("listener ready: watching database %s (stream %s)", self.db.name, self.stream_name)

    def _follow(self, stream: ChangeStream[Any]) -> None:
        """Batches until stop() or until the stream closes (invalidate): the caller reopens it."""
        while not self.stopping:
            self._hold_while_queue_full()
            started = datetime.now(UTC)
            events, token = self._collect(stream)
            # No event and no split event begun: the getMore came back empty, the stream is caught up.
            self.metrics.read(events, idle=not events and not self._fragments.pending)
            self._beat()  # a getMore returned: the loop is alive
            self._keep_lease()
            if events:
                self._pending = Batch(
                    len(events),
                    self._messages(events),
                    token,
                    event_time(events[-1]),
                    late=late_inserts(events, self._gap_ends, self._insert_routes),
                )
                self._advance(token, self._pending.time or started)
                self._deliver_pending()
            else:
                # An idle token is the position when the getMore returned, so no earlier than `started`.
                self._advance(token, started if token != self._position else self._position_time)
                self._idle_checkpoint()
            self.backoff.reset()  # a full turn worked: the next failure starts with a short wait
            self._maybe_summary()
            if not stream.alive:
                # Only an invalidation closes a change stream without an error. The stream watches the
                # database, so only dropDatabase invalidates it; startAfter the invalidate token
                # follows the database's new life.
                log.warning(
                    "change stream invalidated (database %s dropped?): reopening with startAfter %s",
                    self.db.name, _show(self._position),
                )  # fmt: skip
                return

    def _hold_while_queue_full(self) -> None:
        """Read nothing while the broker's queue is at the bound (see the module docstring)."""
        bound = self.backpressure
        if bound is None:
            return
        queued = bound.full()  # BrokerUnavailable: _run_active backs off and retries
        if queued is None:
            return
        log.warning(
            "broker queue holds %d messages, LISTENER_MAX_QUEUE_LENGTH is %d: pausing the change stream "
            "of stream %s until the queue is below %d (checkpoint %s waits)",
            queued, bound.limit, self.stream_name, bound.resume_below, _show(self._saved),
        )  # fmt: skip
        paused_at = time.monotonic()
        if self.health is not None:
            self.health.paused(queued, bound.limit)
        wait: float | None = None
        try:
            while not self.stopping and queued >= bound.resume_below:
                wait = next_wait(wait)
                self._stopping.wait(wait)
                self._beat()
                self._keep_lease()
                self._idle_checkpoint()  # delivered events not saved yet: saved when due, as when idle
                queued = bound.queue_length()
                if self.health is not None:
                    self.health.paused(queued, bound.limit)
        finally:
            if self.health is not None:
                self.health.resumed()
        if not self.stopping:
            log.info(
                "broker queue down to %d messages after %.1fs: resuming the change stream of stream %s",
                queued, time.monotonic() - paused_at, self.stream_name,
            )  # fmt: skip

    def _collect(self, stream: ChangeStream[Any]) -> tuple[list[Mapping[str, Any]], ResumeToken | None]:
        """Up to batch-size events and the resume token after them.

        Stops early when the stream is idle (try_next returned None), when the events the server
        already sent are used up (the next try_next would wait on a getMore: a slow trickle of events
        is published at once instead of after max-await time), or after max-await time. If reading
        fails, the events read so far are dropped with the error: the stream reopens before them and
        reads them again.

        The fragments of a split event (over 16 MB) are reassembled first; an event still incomplete
        at the end is carried to the next call, and the token returned stays before its first
        fragment until it is complete.
        """
        events: list[Mapping[str, Any]] = []
        deadline = time.monotonic() + self.settings.listener_max_await_ms / 1000
        before = stream.resume_token  # the position before the next document
        while len(events) < self.settings.listener_batch_size and not self.stopping:
            document = stream.try_next()
            if document is None or document.get("operationType") == "invalidate":
                break  # after an invalidate the stream is closed: _follow reopens it
            event = self._fragments.feed(document, before)
            before = document["_id"]  # a position after it: the next event may start there
            if event is not None:
                events.append(event)
            if not buffered_events(stream) or time.monotonic() >= deadline:
                break
        return events, self._fragments.position(stream.resume_token)

    def _messages(self, events: Sequence[Mapping[str, Any]]) -> list[Message]:
        messages: list[Message] = []
        for event in events:
            routed = messages_for(event, self.routes)
            if not routed:  # the $match should have filtered it out; harmless, but worth seeing
                log.debug("event %s matches no route", _show(event.get("_id")))
            messages.extend(routed)
        self.stats.events += len(events)
        return messages

    def _deliver_pending(self) -> None:
        """Publish, dead-letter, checkpoint: each step finishes before the next starts."""
        batch = self._pending
        if batch is None:
            return
        if batch.messages:
            self._keep_lease()  # never publish on a lease not confirmed within the renew interval
            publish_started = time.monotonic()
            rejected = self.publisher.publish(batch.messages)  # raises BrokerUnavailable
            self.metrics.published(batch.messages, rejected, time.monotonic() - publish_started)
            published = len(batch.messages) - len(rejected)
            self.stats.tasks += published
            if self.backpressure is not None:
                self.backpressure.published(published)
            log.debug(
                "published %d tasks for %d events, %d unpublishable", published, batch.events, len(rejected)
            )
            batch.messages, batch.rejected = [], list(rejected)
        while batch.rejected:
            self.dead_letter(batch.rejected[0])
            self.metrics.dead_lettered(batch.rejected[0].message.task_name)
            batch.rejected.pop(0)
            self.stats.dead_letters += 1
        while batch.late:  # before the checkpoint: reconcile reads these, then scans from the checkpoint
            gap = next(iter(batch.late))
            self._gap_store().delivered(gap, batch.late[gap])
            del batch.late[gap]
        if self._since_saved() >= self.settings.listener_checkpoint_interval_ms / 1000:
            self._checkpoint(batch.token, batch.time)
        else:
            # Delivered, so `_position` (this batch's end) may be saved; the next due save does it.
            self._unsaved_events = True
        self._pending = None

    def _advance(self, token: ResumeToken | None, when: datetime | None) -> None:
        if token is not None:
            if token != self._position:
                self._time_source = "position_time"
            self._position = token
            self._position_time = when

    def _checkpoint(self, token: ResumeToken | None, when: datetime | None = None) -> None:
        if token is None or token == self._saved:
            return
        epoch = self.lease.epoch if self.lease is not None else None
        if epoch is None and self.lease is not None:
            raise LeaseLost(f"lease of stream {self.stream_name} is not held: checkpoint not saved")
        self.checkpoints.save(self.stream_name, token, epoch=epoch, position_time=when)  # FencedOut
        self._saved, self._saved_at = token, time.monotonic()
        self._unsaved_events = False
        self.stats.checkpoint = token
        self.metrics.checkpoint(when)
        if self.health is not None:
            self.health.progress()

    def _idle_checkpoint(self) -> None:
        # Delivered events not saved yet (a burst just ended): save once the checkpoint interval is up.
        # Otherwise only the idle token advances (postBatchResumeToken): saving it now and then keeps
        # the checkpoint inside the oplog window on quiet streams, without a write per empty getMore.
        if self._unsaved_events:
            due = self.settings.listener_checkpoint_interval_ms / 1000
        else:
            due = self.idle_checkpoint_seconds
        if self._since_saved() >= due:
            self._checkpoint(self._position, self._position_time)

    def _since_saved(self) -> float:
        return time.monotonic() - self._saved_at

    # -- lost history -----------------------------------------------------------------------------
    def _gap_store(self) -> GapStore:
        if self.gaps is None:
            self.gaps = GapStore(self.db)
        return self.gaps

    def _server_now(self) -> datetime:
        try:
            return (self.lease.clock if self.lease is not None else server_clock(self.db))()
        except Exception:  # only a time for a record: the local clock will do
            return datetime.now(UTC)

    def _history_lost(self, exc: OperationFailure) -> int | None:
        """Record the gap; then exit (fail) or continue from now (resume-now, returns None)."""
        from_token, from_time = self._position, self._position_time
        to_time = self._server_now()
        span = f"from {_show(from_token)} ({_iso(from_time)}, {self._time_source}) to {_iso(to_time)}"
        try:
            gap: str | None = self._gap_store().record(
                self.stream_name, from_token, from_time, to_time, time_source=self._time_source
            )
        except PyMongoError as record_error:
            if self.on_history_lost == "resume-now":  # never continue without the record
                self._wait(record_error, "could not record the lost history of stream %s", self.stream_name)
                return None
            gap = None
            log.error("could not record the gap in %s: %s", GAPS_COLLECTION, record_error)
        except Exception as record_error:  # exiting anyway: say so and go on
            if self.on_history_lost == "resume-now":
                raise
            gap = None
            log.error("could not record the gap in %s: %r", GAPS_COLLECTION, record_error)
        if self.on_history_lost == "fail":
            log.error(
                "change stream history lost for stream %s: checkpoint %s is no longer in the oplog; "
                "events %s were NOT delivered. Gap %s recorded in %s. Exiting with code %d; recover "
                "deliberately: restart with --on-history-lost=resume-now, then "
                "`python -m listener reconcile --gap %s`. Error: %s",
                self.stream_name, _show(from_token), span, gap, GAPS_COLLECTION, EXIT_HISTORY_LOST, gap, exc,
            )  # fmt: skip
            return EXIT_HISTORY_LOST
        log.warning(
            "change stream history lost for stream %s: gap %s (events %s) NOT delivered; resuming from "
            "now (--on-history-lost=resume-now). Recover what can be recovered with "
            "`python -m listener reconcile --gap %s`. Error: %s",
            self.stream_name, gap, span, gap, exc,
        )  # fmt: skip
        self._open_gap = gap
        self._position = self._position_time = None
        self._saved = None  # _on_open saves the new start at once
        return None

    # -- waiting, stopping, summaries ---------------------------------------------------------------
    def _refuse_if_denied(self, exc: Exception) -> None:
        """AccessDenied when `exc` says MongoDB refuses these credentials: retrying cannot help."""
        if is_access_denied(exc):
            assert isinstance(exc, OperationFailure)
            raise AccessDenied(
                f"MongoDB refused access on stream {self.stream_name}: "
                f"{(exc.details or {}).get('errmsg', exc)} (code {exc.code}); check the user, password "
                f"and authSource of MONGODB_URI ({mask_url(self.settings.mongodb_uri)}) and the user's roles"
            ) from exc

    def _wait(self, exc: Exception, what: str, *args: Any) -> None:
        self._refuse_if_denied(exc)
        delay = self.backoff.next_delay()
        log.warning(what + "; retrying in %.1fs: %s", *args, delay, exc)
        deadline = time.monotonic() + delay
        while not self.stopping:  # stop() cuts the wait short
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.lease is None or not self.lease.held:
                self._stopping.wait(remaining)
                continue
            self._stopping.wait(min(remaining, self.lease.renew_seconds / 2))
            try:  # the loop is retrying, not stuck: keep the lease (LeaseLost propagates)
                self._keep_lease()
            except PyMongoError as renew_error:
                log.debug("could not renew the lease of stream %s: %s", self.stream_name, renew_error)

    def _pending_tasks(self) -> int:
        return 0 if self._pending is None else len(self._pending.messages)

    def _finish(self) -> int:
        if self._pending is not None:
            # The broker is down: these events stay behind the checkpoint and are read again on restart.
            log.warning(
                "stopping with %d events not delivered; they will be read again after the checkpoint",
                self._pending.events,
            )
        else:
            try:
                self._checkpoint(self._position, self._position_time)
            except (PyMongoError, FencedOut, LeaseLost) as exc:  # an older checkpoint: a few events re-read
                log.warning("could not save the final checkpoint: %s", exc)
        self._summary()
        log.info("listener stopped")
        return EXIT_OK

    def _maybe_summary(self) -> None:
        if time.monotonic() - self._summary_at >= self.summary_seconds:
            self._summary()

    def _summary(self) -> None:
        self._summary_at = time.monotonic()
        log.info(
            "stream %s: %d events seen, %d tasks published, %d dead-lettered, checkpoint %s",
            self.stream_name, self.stats.events, self.stats.tasks, self.stats.dead_letters,
            _show(self.stats.checkpoint),
        )  # fmt: skip


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "unknown time"


def _show(token: Any) -> str:
    """A resume token for a log line: its _data hex, which sorts in stream order."""
    if isinstance(token, Mapping) and "_data" in token:
        return str(token["_data"])
    return repr(token)
