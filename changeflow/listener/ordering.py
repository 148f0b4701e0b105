"""Per-key ordering, the listener's side: the key of an event, and registering members before publishing.

`ordered_by` (on `@app.on`) is "documentKey" (`ordered_by=True`) or a dotted field path of the task
payload (`fullDocument.user_id`). The key is `<path>=<canonical extended JSON of the value>`, so equal
BSON values give equal keys and paths never collide. A missing or null value has no key: the message
is a dead letter "unorderable" rather than run out of order (docs/ordering.md).

`OrderingPublisher` wraps the configured publisher: it adds the batch's ordered members to their
sets in the dedup store's Redis (one round trip, idempotent) before the batch is published, and
turns unorderable messages into `Rejected`. The checkpoint moves only after publish returns, so a
crash between the two re-reads the events and registers them again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis.exceptions
from bson import json_util

from changeflow.listener.payload import PAYLOAD_FIELDS
from changeflow.worker.ordering import Order, OrderBook

if TYPE_CHECKING:
    from changeflow.listener.publish import Message, Publisher, Rejected

DOCUMENT_KEY = "documentKey"
_MISSING = object()


def ordering_path(ordered_by: object) -> str | None:
    """The normalized `ordered_by` of a route: None (unordered), or a payload field path.

    ValueError for anything else, at declaration.
    """
    if ordered_by is None or ordered_by is False:
        return None
    if ordered_by is True:
        return DOCUMENT_KEY
    if not isinstance(ordered_by, str) or not ordered_by:
        raise ValueError(f"ordered_by must be True, 'documentKey' or a field path, got {ordered_by!r}")
    parts = ordered_by.split(".")
    if any(not p or p.startswith("$") for p in parts):
        raise ValueError(f"ordered_by {ordered_by!r} is not a field path")
    if parts[0] not in PAYLOAD_FIELDS or parts[0] == "_id":
        fields = ", ".join(f for f in PAYLOAD_FIELDS if f != "_id")
        raise ValueError(f"ordered_by {ordered_by!r} must start with a task payload field ({fields})")
    return ordered_by


def order_key(event: Mapping[str, Any], path: str) -> str | None:
    """The ordering key of `event` under `path`, or None when the event has no value there."""
    value: Any = event
    for part in path.split("."):
        value = value.get(part, _MISSING) if isinstance(value, Mapping) else _MISSING
        if value is _MISSING:
            return None
    if value is None:
        return None
    return f"{path}={json_util.dumps(value, json_options=json_util.CANONICAL_JSON_OPTIONS)}"


def order_for(event: Mapping[str, Any], path: str) -> Order:
    """The event's Order under `path`; its key is "" when the event has none (unorderable)."""
    return Order(order_key(event, path) or "", event["_id"]["_data"])


class OrderingUnavailable(Exception):
    """The dedup store's Redis did not take the batch's members."""


class OrderingPublisher:
    """A `Publisher` that registers ordered messages before `inner` publishes them (module doc)."""

    def __init__(self, inner: Publisher, book: OrderBook) -> None:
        self.inner = inner
        self.book = book

    def publish(self, messages: Sequence[Message]) -> list[Rejected]:
        from changeflow.listener.publish import BrokerUnavailable, Rejected

        rejected: list[Rejected] = []
        sendable: list[Message] = []
        entries: list[tuple[str, Order]] = []
        for message in messages:
            order = message.order
            if order is not None and not order.key:
                error = f"ordered_by {message.ordered_by!r}: the event has no value there (missing or null)"
                rejected.append(Rejected(message, f"Unorderable: {error}", "", reason="unorderable"))
                continue
            if order is not None:
                entries.append((message.task_name, order))
            sendable.append(message)
        try:
            self.book.register(entries)
        except (redis.exceptions.RedisError, OSError) as exc:
            # Transient as a broker outage: the batch is retried, its checkpoint does not move.
            raise BrokerUnavailable(f"ordering store (REDIS_URL) unavailable: {exc}") from exc
        return self.inner.publish(sendable) + rejected

    def check(self) -> None:
        check = getattr(self.inner, "check", None)
        if check is not None:
            check()

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
        self.book.client.close()
