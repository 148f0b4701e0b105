"""Change events -> task messages -> the broker.

`messages_for(event, routes)` builds the messages of one event (task name, task id, payload);
a `Publisher` hands a batch of them to the broker. `CeleryPublisher` sends each message through
the app's Celery app, so workers consume exactly what `app.send_task` produces.

The `Publisher` seam is where a faster implementation plugs in later: kombu 5.7's
`Producer.batch()` pipelines a batch of prepared messages into one Redis round trip, with the same
message bytes; the listener would not change.

Errors are split in two on purpose:
- the broker is unavailable (`BrokerUnavailable`): transient, the whole batch is retried and the
  checkpoint does not move;
- one message cannot be serialized (a value that is not BSON; every BSON value is carried): permanent for that
  event, so it is returned as a `Rejected` and dead-lettered, and the other messages go through.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import kombu.exceptions
import redis.exceptions
from kombu.serialization import dumps

from changeflow import tracing
from changeflow.listener.ordering import OrderingPublisher, order_for
from changeflow.listener.payload import task_payload
from changeflow.listener.routes import Route, tasks_for
from changeflow.worker.dead_letters import record_dead_letter
from changeflow.worker.keys import dedup_key
from changeflow.worker.ordering import Order, OrderBook, order_headers

if TYPE_CHECKING:
    from celery import Celery
    from pymongo.database import Database

    from changeflow.worker.settings import Settings

# What a broker outage looks like from kombu/redis-py. kombu re-raises most connection errors as its
# OperationalError; the rest are listed so none of them escapes as "unexpected".
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)
# A message whose payload the serializer refuses: kombu wraps serializer failures in EncodeError.
ENCODE_ERRORS: tuple[type[BaseException], ...] = (kombu.exceptions.EncodeError, TypeError)


class Message(NamedTuple):
    """One task to send: `app.send_task(task_name, args=[payload], task_id=task_id)`.

    `order` (a task declared with `ordered_by`, whose path is `ordered_by`): its key and member,
    sent as message headers (changeflow/worker/ordering.py); a key of "" means the event has none.
    """

    task_name: str
    task_id: str
    payload: dict[str, Any]
    order: Order | None = None
    ordered_by: str | None = None
    headers: Mapping[str, str] | None = None  # trace context (changeflow/tracing.py), when tracing is on


class Rejected(NamedTuple):
    """A message the serializer refused (or without an ordering key): permanent, to be dead-lettered."""

    message: Message
    error: str
    traceback: str
    reason: str = "unpublishable"


class BrokerUnavailable(Exception):
    """The broker did not accept the batch; some messages of it may have been sent already."""


class Publisher(Protocol):
    def publish(self, messages: Sequence[Message]) -> list[Rejected]:
        """Send `messages`; on return, every message not returned as rejected is in the broker.

        Raises BrokerUnavailable when the broker could not be reached; the caller retries the whole
        batch (duplicates carry the same task id, which the workers' dedup guard absorbs).
        """
        ...


def messages_for(event: Mapping[str, Any], routes: Iterable[Route], *, ordered: bool = True) -> list[Message]:
    """The task messages for one change event, one per routed task, all sharing one payload.

    A task some route declares `ordered_by` gets the event's Order (unless `ordered=False`: synthetic
    events of `reconcile` have no place in the stream's order).
    """
    routes = tuple(routes)
    names = tasks_for(event, routes)
    if not names:
        return []
    payload = task_payload(event)
    paths = {name: r.ordered_by for r in routes if r.ordered_by for name in r.tasks} if ordered else {}
    headers = tracing.event_headers(event)  # None unless OpenTelemetry is configured
    messages = []
    for name in names:
        path = paths.get(name)
        order = order_for(payload, path) if path is not None else None
        messages.append(Message(name, dedup_key(event["_id"], name), payload, order, path, headers))
    return messages


def send_headers(message: Message) -> dict[str, str] | None:
    """The headers send_task adds for `message`: its ordering key and member, its trace context."""
    headers = {**(order_headers(message.order) if message.order else {}), **(message.headers or {})}
    return headers or None


def task_queue(app: Celery, task_name: str) -> str | None:
    """The queue of `task_name` when it has its own (`@app.on(..., queue=...)`), else None (the default).

    Celery's send_task by name does not read the registered task's options, so the publishers pass
    its queue themselves.
    """
    task = app.tasks.get(task_name)
    queue = getattr(task, "queue", None)
    if not queue or queue == app.conf.task_default_queue:
        return None
    return str(queue)


def task_queues(app: Celery, task_names: Iterable[str]) -> list[str]:
    """Every queue these tasks are sent to: the default queue first, then the tasks' own."""
    queues = [app.conf.task_default_queue]
    for name in task_names:
        queue = task_queue(app, name)
        if queue is not None and queue not in queues:
            queues.append(queue)
    return queues


class CeleryPublisher:
    """Publishes through a Celery app (the loaded changeflow app), one pooled producer per batch.

    Celery's own publish retry is off: it would block the stream loop for a long time with the batch
    half-sent. A failed publish raises after one connection attempt (bounded by Celery's
    broker_connection_timeout), and the listener backs off and retries the batch.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app  # the shared app: same serializer and broker as the workers

    def publish(self, messages: Sequence[Message]) -> list[Rejected]:
        rejected: list[Rejected] = []
        if not messages:
            return rejected
        try:
            with self.app.producer_or_acquire() as producer:
                for message in messages:
                    try:
                        self.app.send_task(
                            message.task_name,
                            args=[message.payload],
                            task_id=message.task_id,
                            producer=producer,
                            retry=False,
                            add_to_parent=False,
                            queue=task_queue(self.app, message.task_name),
                            headers=send_headers(message),
                        )
                    except ENCODE_ERRORS as exc:
                        # Serialization happens before any I/O, so the producer is still usable.
                        rejected.append(
                            Rejected(message, f"{type(exc).__name__}: {exc}", traceback.format_exc())
                        )
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"broker unavailable: {exc}") from exc
        return rejected


def record_unpublishable(db: Database, rejected: Rejected, serializer: str = "json") -> None:
    """Dead-letter a message the serializer refused ("unpublishable") or without a key ("unorderable")."""
    message = rejected.message
    # record_dead_letter logs it at ERROR.
    record_dead_letter(
        db,
        task_name=message.task_name,
        task_id=message.task_id,
        payload=storable(message.payload, serializer),
        error=rejected.error,
        traceback=rejected.traceback,
        attempts=1,
        reason=rejected.reason,
    )


def storable(value: Any, serializer: str = "json") -> Any:
    """`value` with every leaf the serializer refuses replaced by its repr().

    The dead letter then holds a payload that can be stored, read and replayed; the repr shows what
    the offending value was.
    """
    if isinstance(value, Mapping):
        return {key: storable(item, serializer) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [storable(item, serializer) for item in value]
    try:
        dumps(value, serializer=serializer)
    except ENCODE_ERRORS:
        return repr(value)
    return value


def make_publisher(settings: Settings, app: Celery) -> Publisher:
    """The publisher LISTENER_PUBLISHER names, sending through `app`: "pipelined" (default) or "celery"."""
    publisher: Publisher
    if settings.listener_publisher == "celery":
        publisher = CeleryPublisher(app)
    else:
        from changeflow.listener.pipelined import (
            PipelinedPublisher,  # imports this module: import here, not at the top
        )

        publisher = PipelinedPublisher(app)
    from changeflow.listener.batching import BatchingPublisher, batch_sizes

    sizes = batch_sizes(app)
    if sizes:
        # Batched tasks' events go as lists (changeflow/listener/batching.py); never ordered ones.
        publisher = BatchingPublisher(publisher, sizes)
    routes = getattr(app, "routes", ())
    if any(route.ordered_by for route in routes):
        # Ordered tasks' members go into their sets before the batch is published (both publishers).
        return OrderingPublisher(publisher, OrderBook.from_settings(settings))
    return publisher
