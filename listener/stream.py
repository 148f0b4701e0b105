"""The watch loop: change stream -> batches of task messages -> broker -> checkpoint.

One database-level change stream, filtered server-side by the routes' `$match`. Each turn of the
loop collects a batch of events, publishes their task messages, dead-letters the messages the
serializer refuses, and only then moves the checkpoint. So after any crash, a restart resumes at
or before the first event whose tasks are not in the broker: events are never lost, and an event
published twice carries the same task ids both times (the workers' dedup guard drops the copy).

Failures:
- MongoDB unreachable or a resumable server error: reopen the stream from the last position, after
  an exponential, capped, jittered backoff.
- Broker unavailable: keep the batch, back off, publish it again; the checkpoint waits.
- ChangeStreamHistoryLost (code 286: the checkpoint fell off the oplog) or another non-resumable
  error: stop with a distinct exit code. Silently starting "now" would skip events.
- Invalidate (the watched database was dropped): log it and reopen after the invalidation.

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
from functools import partial
from typing import Any

from pymongo.change_stream import ChangeStream
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from listener.backoff import Backoff
from listener.checkpoints import CheckpointStore, ResumeToken
from listener.exit_codes import EXIT_FATAL, EXIT_HISTORY_LOST, EXIT_OK
from listener.publish import (
    BrokerUnavailable,
    Message,
    Publisher,
    Rejected,
    messages_for,
    record_unpublishable,
)
from listener.routes import ROUTES, Route, compile_match
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

HISTORY_LOST = 286  # ChangeStreamHistoryLost
# Server errors after which reopening the stream is expected to work: the change streams spec's
# resumable codes (for servers that do not label them), CursorNotFound, and WriteConcernFailed (64)
# for the checkpoint and dead-letter writes.
RESUMABLE_CODES = frozenset(
    {6, 7, 43, 63, 64, 89, 91, 133, 150, 189, 234, 262, 9001, 10107, 11600, 11602, 13388, 13435, 13436}
)


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
    rejected: list[Rejected] = field(default_factory=list)


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
    each message the serializer refused.
    """

    def __init__(
        self,
        db: Database,
        publisher: Publisher,
        checkpoints: CheckpointStore | None = None,
        routes: Sequence[Route] = ROUTES,
        settings: Settings | None = None,
        *,
        dead_letter: Callable[[Rejected], None] | None = None,
        backoff: Backoff | None = None,
        idle_checkpoint_seconds: float = 5.0,
        summary_seconds: float = 60.0,
    ) -> None:
        settings = settings or get_settings()
        if settings.listener_batch_size < 1:
            raise ValueError("LISTENER_BATCH_SIZE must be at least 1")
        self.db = db
        self.publisher = publisher
        self.checkpoints = checkpoints or CheckpointStore(db)
        self.routes = tuple(routes)
        self.settings = settings
        self.dead_letter = dead_letter or partial(record_unpublishable, db)
        self.backoff = backoff or Backoff()
        self.idle_checkpoint_seconds = idle_checkpoint_seconds
        self.summary_seconds = summary_seconds
        self.stream_name = self.settings.listener_stream_name
        self.pipeline = [{"$match": compile_match(self.routes)}]  # fails early on an empty route table
        self.stats = Stats()
        # Set once the first stream is open (and a starting checkpoint saved): from then on, every
        # change is delivered.
        self.ready = threading.Event()
        self._stopping = threading.Event()
        # Where to reopen the stream: after every event that is delivered or held in _pending.
        self._position: ResumeToken | None = None
        self._pending: Batch | None = None
        self._saved: ResumeToken | None = None
        self._saved_at = 0.0
        self._summary_at = 0.0

    def stop(self) -> None:
        """Finish the batch in flight (publish + checkpoint), then make run() return. Signal-safe."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> int:
        """Follow the stream until stop() or a fatal error; returns the process exit code."""
        self._summary_at = time.monotonic()
        loaded = False
        while not self.stopping:
            try:
                if not loaded:  # inside the loop: MongoDB may be unreachable at start, too
                    self._load_checkpoint()
                    loaded = True
                self._deliver_pending()  # a batch left over from a broker outage goes first
                with self._open() as stream:
                    self._on_open(stream)
                    self._follow(stream)
            except BrokerUnavailable as exc:
                self._wait(exc, "broker unavailable, holding %d unpublished tasks", self._pending_tasks())
            except PyMongoError as exc:
                if isinstance(exc, OperationFailure) and exc.code == HISTORY_LOST:
                    log.error(
                        "change stream history lost for stream %s: checkpoint %s is no longer in the oplog; "
                        "events since then were NOT delivered. Exiting with code %d; recover deliberately "
                        "(re-sync from the data, or delete the checkpoint to start now). Error: %s",
                        self.stream_name, _show(self._position), EXIT_HISTORY_LOST, exc,
                    )  # fmt: skip
                    return EXIT_HISTORY_LOST
                if not is_resumable(exc):
                    log.error("non-resumable MongoDB error on stream %s, exiting: %r", self.stream_name, exc)
                    return EXIT_FATAL
                self._wait(exc, "MongoDB error on stream %s", self.stream_name)
        return self._finish() if loaded else EXIT_OK

    def _load_checkpoint(self) -> None:
        self._saved = self._position = self.checkpoints.load(self.stream_name)
        self.stats.checkpoint = self._saved
        if self._saved is None:
            log.info("no checkpoint for stream %s: starting now", self.stream_name)
        else:
            log.info("resuming stream %s after checkpoint %s", self.stream_name, _show(self._saved))

    def _open(self) -> ChangeStream[Any]:
        return self.db.watch(
            self.pipeline,
            full_document="updateLookup",
            start_after=self._position,  # None: start now (see the module docstring for why not resume_after)
            max_await_time_ms=self.settings.listener_max_await_ms,
            batch_size=self.settings.listener_batch_size,
        )

    def _on_open(self, stream: ChangeStream[Any]) -> None:
        self._advance(stream.resume_token)
        if self._saved is None:
            # First start ever: make "now" durable at once, so a crash before the first event still
            # resumes here instead of at a later "now".
            self._checkpoint(self._position)
        if not self.ready.is_set():
            self.ready.set()
            log.info("listener ready: watching database %s (stream %s)", self.db.name, self.stream_name)

    def _follow(self, stream: ChangeStream[Any]) -> None:
        """Batches until stop() or until the stream closes (invalidate): the caller reopens it."""
        while not self.stopping:
            events, token = self._collect(stream)
            if events:
                self._pending = Batch(len(events), self._messages(events), token)
                self._advance(token)
                self._deliver_pending()
            else:
                self._advance(token)
                self._idle_checkpoint()
            self.backoff.reset()  # a full turn worked: the next failure starts with a short wait
            self._maybe_summary()
            if not stream.alive:
                # Only an invalidation closes a change stream without an error.
                log.warning(
                    "change stream invalidated (database %s dropped?): reopening after the invalidation",
                    self.db.name,
                )
                return

    def _collect(self, stream: ChangeStream[Any]) -> tuple[list[Mapping[str, Any]], ResumeToken | None]:
        """Up to batch-size events and the resume token after them.

        Stops early when the stream is idle (try_next returned None) or after max-await time, so a
        slow trickle of events is still published promptly. If reading fails, the events read so far
        are dropped with the error: the stream reopens before them and reads them again.
        """
        events: list[Mapping[str, Any]] = []
        deadline = time.monotonic() + self.settings.listener_max_await_ms / 1000
        while len(events) < self.settings.listener_batch_size and not self.stopping:
            event = stream.try_next()
            if event is None or event.get("operationType") == "invalidate":
                break  # after an invalidate the stream is closed: _follow reopens it
            events.append(event)
            if time.monotonic() >= deadline:
                break
        return events, stream.resume_token

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
            rejected = self.publisher.publish(batch.messages)  # raises BrokerUnavailable
            published = len(batch.messages) - len(rejected)
            self.stats.tasks += published
            log.debug(
                "published %d tasks for %d events, %d unpublishable", published, batch.events, len(rejected)
            )
            batch.messages, batch.rejected = [], list(rejected)
        while batch.rejected:
            self.dead_letter(batch.rejected[0])
            batch.rejected.pop(0)
            self.stats.dead_letters += 1
        self._checkpoint(batch.token)
        self._pending = None

    def _advance(self, token: ResumeToken | None) -> None:
        if token is not None:
            self._position = token

    def _checkpoint(self, token: ResumeToken | None) -> None:
        if token is None or token == self._saved:
            return
        self.checkpoints.save(self.stream_name, token)
        self._saved, self._saved_at = token, time.monotonic()
        self.stats.checkpoint = token

    def _idle_checkpoint(self) -> None:
        # An idle stream's token still advances (postBatchResumeToken). Saving it now and then keeps
        # the checkpoint inside the oplog window on quiet streams, without a write per empty getMore.
        if time.monotonic() - self._saved_at >= self.idle_checkpoint_seconds:
            self._checkpoint(self._position)

    def _wait(self, exc: Exception, what: str, *args: Any) -> None:
        delay = self.backoff.next_delay()
        log.warning(what + "; retrying in %.1fs: %s", *args, delay, exc)
        self._stopping.wait(delay)  # stop() cuts the wait short

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
                self._checkpoint(self._position)
            except PyMongoError as exc:  # an older checkpoint only means re-reading a few events
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


def _show(token: Any) -> str:
    """A resume token for a log line: its _data hex, which sorts in stream order."""
    if isinstance(token, Mapping) and "_data" in token:
        return str(token["_data"])
    return repr(token)
