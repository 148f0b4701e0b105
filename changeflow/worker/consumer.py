"""The worker's consumer: Celery's own, sending its buffered task events in groups of up to a window.

A worker sends three task events per task (received, started, succeeded; what Flower shows). Celery's
consumer buffers them and publishes the buffer on the event loop's next turn, so at a steady trickle
each event goes out alone: one Redis PUBLISH (a synchronous round trip through kombu's producer) per
event, the largest cost of the worker's main process. This consumer publishes the buffer at most once
per `WORKER_EVENT_FLUSH_MS` instead: the same events, with the timestamps they were made with, in
fewer messages (a list body on routing key `task.multi`, as Celery's buffer sends them). Flower sees
them up to that window later. Celery's own limit still applies: a buffer of 24 events goes out at once.

Set in worker.app (`worker_consumer`); `WORKER_EVENT_FLUSH_MS=0` restores Celery's behaviour.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.message import Message

from changeflow.worker.dead_letters import record_dead_letter, undecodable_payload
from changeflow.worker.metrics import dead_letter_stored
from changeflow.worker.mongo import get_db
from changeflow.worker.ordering import KEY_HEADER
from changeflow.worker.settings import get_settings

logger = logging.getLogger(__name__)

# How long a message that could not be decoded nor dead-lettered waits before it is queued again:
# the next try is not a busy loop while MongoDB is unreachable.
UNDECODABLE_REQUEUE_SECONDS = 5.0


class Consumer(CeleryConsumer):
    """celery.worker.consumer.Consumer, its buffered task events sent once per flush window."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.event_flush_seconds = get_settings().worker_event_flush_ms / 1000
        self._event_flush_timer: Any = None  # kombu timer entry of the pending flush

    def on_send_event_buffered(self) -> None:
        if self.hub is None or self.event_flush_seconds <= 0:
            super().on_send_event_buffered()
        elif self._event_flush_timer is None:
            self._event_flush_timer = self.hub.call_later(self.event_flush_seconds, self._flush_window)

    def _flush_window(self) -> None:
        self._event_flush_timer = None
        self._flush_events()

    def _flush_pending_events(self) -> None:
        """Send what the window holds now: before the consumer stops (shutdown or reconnect)."""
        if self._event_flush_timer is None:
            return
        self._event_flush_timer.cancel()
        self._event_flush_timer = None
        try:
            # A broker error does not raise here: Celery's dispatcher keeps the events it could not
            # publish and the next dispatcher (after a reconnect) sends them.
            self._flush_events()
        except Exception:  # anything else: stopping goes on, and the log says what Flower misses
            logger.warning("buffered task events were not sent (Flower misses them)", exc_info=True)

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        """A task message this worker cannot decode: a dead letter ("undecodable"), then acked.

        Celery's own handler logs it and acks it: the task would be gone. When the dead letter
        cannot be stored (MongoDB down), the message goes back to the queue after
        UNDECODABLE_REQUEUE_SECONDS, to be tried again, instead of being acked.
        """
        headers = message.headers or {}
        task_name, task_id = str(headers.get("task", "?")), str(headers.get("id", "?"))
        logger.error("cannot decode task message %s %s: %r", task_name, task_id, exc)
        try:
            record_dead_letter(
                get_db(),
                task_name=task_name,
                task_id=task_id,
                payload=undecodable_payload(message.body),
                error=f"{type(exc).__name__}: {exc}",
                traceback="".join(traceback.format_exception(exc)),
                attempts=1,
                reason="undecodable",
            )
        except Exception:
            logger.exception(
                "dead letter of undecodable task message %s %s not stored: it goes back to the queue",
                task_name,
                task_id,
            )
            timer = getattr(self, "timer", None)
            if self.hub is not None:
                self.hub.call_later(UNDECODABLE_REQUEUE_SECONDS, message.reject, True)
            elif getattr(getattr(self, "pool", None), "is_green", False) and timer is not None:
                # gevent/eventlet have no event loop hub: the pool's timer rejects it later, in a
                # greenlet of this thread (the broker channel is not shared with another thread).
                timer.call_after(UNDECODABLE_REQUEUE_SECONDS, message.reject, (True,))
            else:
                message.reject(requeue=True)
            return
        dead_letter_stored(task_name, "undecodable")
        if KEY_HEADER in headers:  # an ordered task's message
            _advance_past(self.app, task_name, headers)
        message.ack()

    def stop(self) -> None:
        self._flush_pending_events()
        super().stop()

    def shutdown(self) -> None:
        self._flush_pending_events()
        super().shutdown()


def _advance_past(app: Any, task_name: str, headers: Any) -> None:
    """An undecodable ordered message is a dead letter: its key moves on past it (docs/ordering.md)."""
    from changeflow.worker.dedup import get_dedup_store
    from changeflow.worker.idempotent import unpark_message
    from changeflow.worker.ordering import MEMBER_HEADER, Order, OrderBook

    key, member = headers.get(KEY_HEADER), headers.get(MEMBER_HEADER)
    if not (isinstance(key, str) and isinstance(member, str) and key and member):
        return
    try:
        advanced = OrderBook.of(get_dedup_store().client).advance(task_name, Order(key, member))
        if advanced.parked is not None:
            parked = unpark_message(advanced.parked)
            app.send_task(
                parked["task"], args=parked["args"], kwargs=parked["kwargs"], task_id=parked["id"],
                headers=parked["headers"], queue=getattr(app.tasks.get(parked["task"]), "queue", None),
            )  # fmt: skip
    except Exception:
        logger.exception(
            "could not advance key %r of %s past an undecodable message: it waits", key, task_name
        )
