"""A fast `Publisher`: one pipelined Redis round trip per batch, with the messages `send_task` would send.

`CeleryPublisher` pays, per message, for Celery's `saferepr` of the payload (the `argsrepr` header),
kombu's entity declarations and copies, and one Redis round trip (two with task-sent events). This
publisher builds the same Celery protocol-2 message with `app.amqp.as_task_v2` (the function
`send_task` uses), serializes the body with the app's task serializer (kombu's registry, where
worker.serialization registered the BSON types), wraps it in the kombu Redis transport's envelope
and sends the whole batch with one `LPUSH` per queue in one `pipeline(transaction=False)`. Workers
consume the messages unchanged: same task ids, headers (except `argsrepr`, see below), properties
and body.

Differences from `send_task`, on purpose:
- `argsrepr` (shown by Flower and in worker logs; never read to run the task) is a short summary of
  the event (`_id`, `operationType`, `ns`, `documentKey`) instead of a saferepr of the whole payload,
  which is the most expensive step of `send_task`. `exact_argsrepr=True` restores Celery's.
- No queue/exchange declaration per message: the default queue of Redis needs none (kombu's binding
  sets only matter for non-default exchanges), and workers declare their queues on start.

Task-sent events (`task_send_sent_event`, what Flower shows as SENT before a worker receives the
task) are published in the same pipeline, with the same fields Celery's event dispatcher gives them,
grouped into one message per batch the way Celery's dispatcher sends buffered events (a list body
on routing key `task.multi`, as workers send their task events): Flower sees the same events on both
paths, for one PUBLISH per batch instead of one per message.

Guarantees are those of the `Publisher` protocol: a message the serializer refuses is returned as
`Rejected` (nothing of it is sent); any Redis error raises `BrokerUnavailable` and the caller
retries the whole batch (an LPUSH that did get through is then sent twice, with the same task id,
which the workers' dedup guard absorbs); when `publish` returns, Redis has accepted every
other message.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis
import redis.exceptions
from celery.events.event import Event
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from celery.utils.time import utcoffset
from kombu.serialization import dumps as kombu_dumps
from redis.backoff import NoBackoff
from redis.retry import Retry

from listener.publish import BROKER_ERRORS, ENCODE_ERRORS, BrokerUnavailable, Message, Rejected
from worker.app import app as worker_app

if TYPE_CHECKING:
    from celery import Celery

# Values per LPUSH command: bounds one command's size (Redis' limit is far higher) while keeping the
# number of commands per batch small.
LPUSH_CHUNK = 1000
# Task-sent events go out grouped, as Celery's dispatcher sends buffered groups of events.
EVENTS_ROUTING_KEY = "task.multi"
# Fields of the payload summarized in the argsrepr header: what identifies the event.
SUMMARY_FIELDS = ("_id", "operationType", "ns", "documentKey")


def delivery_tags() -> Callable[[], str]:
    """Unique delivery tags shaped like kombu's (a uuid4 string), without a uuid4 per message.

    kombu only needs them unique (the consumer's unacked hash is keyed by them). A random uuid4 per
    publisher with a counter in its last 48 bits keeps them unique across listeners and restarts
    (74 random bits per publisher) at a fraction of the cost: two uuid4 per message were ~15% of
    the publisher's time.
    """
    base = str(uuid.uuid4())[:24]
    counter = itertools.count(int.from_bytes(os.urandom(5), "big"))
    return lambda: f"{base}{next(counter) & 0xFFFFFFFFFFFF:012x}"


def summary_argsrepr(payload: Mapping[str, Any]) -> str:
    """A cheap argsrepr: the identifying fields of the event, in the shape saferepr would print."""
    fields = ", ".join(f"{key!r}: {payload[key]!r}" for key in SUMMARY_FIELDS if key in payload)
    more = ", ..." if len(payload) > sum(1 for key in SUMMARY_FIELDS if key in payload) else ""
    return f"[{{{fields}{more}}}]"


class PipelinedPublisher:
    """Publishes a batch of task messages in one pipelined Redis round trip (see the module doc).

    `app` (default `worker.app`) gives the broker URL, the task serializer, the default queue, and
    whether task-sent events are on. `client` replaces the Redis client made from the broker URL.
    """

    def __init__(
        self,
        app: Celery | None = None,
        *,
        client: redis.Redis | None = None,
        exact_argsrepr: bool = False,
        delivery_tag: Callable[[], str] | None = None,
    ) -> None:
        self.app = app or worker_app
        self.exact_argsrepr = exact_argsrepr
        self._delivery_tag = delivery_tag or delivery_tags()
        self._client = client
        self._layout: _Layout | None = None
        self._content = ("application/json", "utf-8")  # set by _body() from the serializer
        self._utcoffset = 0

    # -- the Publisher protocol ----------------------------------------------------------------
    def publish(self, messages: Sequence[Message]) -> list[Rejected]:
        rejected: list[Rejected] = []
        if not messages:
            return rejected
        try:
            layout = self._get_layout()
            client = self._get_client()
        except (*BROKER_ERRORS, redis.exceptions.RedisError) as exc:
            raise BrokerUnavailable(f"broker unavailable: {exc}") from exc
        envelopes: list[str] = []
        events: list[dict[str, Any]] = []
        self._utcoffset = utcoffset()  # once per batch: it reads the local time zone
        last: tuple[Any, bytes] | None = None  # (payload, body) of the previous message
        for message in messages:
            try:
                # The messages of one event share their payload object, and so their body.
                if last is None or last[0] is not message.payload:
                    last = (message.payload, self._body(message.payload))
                envelope, event = self._envelope(layout, message, last[1])
            except ENCODE_ERRORS as exc:
                rejected.append(Rejected(message, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
                continue
            envelopes.append(envelope)
            if event is not None:
                events.append(event)
        if envelopes:
            self._send(client, layout, envelopes, events)
        return rejected

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # -- building ------------------------------------------------------------------------------
    def _body(self, payload: dict[str, Any]) -> bytes:
        """The task body `(args, kwargs, embed)` as send_task encodes it, base64'd as the transport does."""
        content_type, content_encoding, data = kombu_dumps(
            ([payload], {}, _EMBED), serializer=self.app.conf.task_serializer
        )
        self._content = (content_type, content_encoding)
        raw = data.encode(content_encoding) if isinstance(data, str) else data
        return base64.b64encode(raw)

    def _envelope(
        self, layout: _Layout, message: Message, body: bytes
    ) -> tuple[str, dict[str, Any] | None]:
        payload = message.payload
        argsrepr = (
            saferepr([payload], self.app.amqp.argsrepr_maxsize, maxlevels=self.app.conf.task_repr_maxlevels)
            if self.exact_argsrepr
            else summary_argsrepr(payload)
        )
        task = self.app.amqp.as_task_v2(
            message.task_id,
            message.task_name,
            args=_NO_ARGS,  # the body is encoded separately (and shared by the event's messages)
            argsrepr=argsrepr,
            kwargsrepr="{}",
            origin=layout.origin,
            reply_to=layout.reply_to,
            create_sent_event=layout.sent_events,
            ignore_result=None,  # what send_task passes when the task is not given ignore_result
        )
        headers, properties, _, sent_event = task
        content_type, content_encoding = self._content
        properties["delivery_mode"] = 2  # persistent, as the default queue's delivery mode
        properties["delivery_info"] = {"exchange": "", "routing_key": layout.routing_key}
        properties["priority"] = 0
        properties["body_encoding"] = "base64"
        properties["delivery_tag"] = self._delivery_tag()
        envelope = json.dumps(
            {
                "body": body.decode("ascii"),
                "content-encoding": content_encoding,
                "content-type": content_type,
                "headers": headers,
                "properties": properties,
            }
        )
        if sent_event is None:
            return envelope, None
        return envelope, self._sent_event(layout, sent_event)

    def _sent_event(self, layout: _Layout, fields: dict[str, Any]) -> dict[str, Any]:
        """The task-sent event, with the fields celery.events.EventDispatcher gives it after send_task."""
        return Event(
            "task-sent",
            hostname=layout.origin,
            utcoffset=self._utcoffset,
            pid=layout.pid,
            clock=self.app.clock.forward(),
            **fields,
            queue=layout.queue,
            exchange="",
            routing_key=layout.routing_key,
        )

    def _events_message(self, layout: _Layout, events: list[dict[str, Any]]) -> str:
        """Many events in one message, as Celery's dispatcher sends a buffered group ("task.multi").

        Event receivers (Flower, `celery events`) take a list body as that many events, so Flower
        sees each task-sent event as if it came alone, for one PUBLISH per batch instead of one per
        message.
        """
        body = base64.b64encode(json.dumps(events).encode("utf-8")).decode("ascii")
        return json.dumps(
            {
                "body": body,
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {"hostname": layout.origin},
                "properties": {
                    "delivery_mode": 1,
                    "delivery_info": {"exchange": "celeryev", "routing_key": EVENTS_ROUTING_KEY},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": self._delivery_tag(),
                },
            }
        )

    # -- sending -------------------------------------------------------------------------------
    def _send(
        self, client: redis.Redis, layout: _Layout, envelopes: list[str], events: list[dict[str, Any]]
    ) -> None:
        pipe = client.pipeline(transaction=False)
        # One LPUSH with many values pushes them in order, exactly as many LPUSHes would: workers
        # (BRPOP from the other end) take them first in, first out.
        for start in range(0, len(envelopes), LPUSH_CHUNK):
            pipe.lpush(layout.queue_key, *envelopes[start : start + LPUSH_CHUNK])
        for start in range(0, len(events), LPUSH_CHUNK):
            grouped = self._events_message(layout, events[start : start + LPUSH_CHUNK])
            for topic in layout.event_topics:
                pipe.publish(topic, grouped)
        try:
            pipe.execute()
        except redis.exceptions.RedisError as exc:
            # Connection errors and error replies alike (READONLY after a failover, OOM): the batch
            # is retried whole, the checkpoint does not move.
            raise BrokerUnavailable(f"broker unavailable: {exc}") from exc

    def _get_client(self) -> redis.Redis:
        if self._client is None:
            conf = self.app.conf
            options = conf.broker_transport_options or {}
            timeout = conf.broker_connection_timeout or 4.0
            self._client = redis.Redis.from_url(
                conf.broker_url,
                socket_connect_timeout=options.get("socket_connect_timeout", timeout),
                socket_timeout=options.get("socket_timeout", 10.0),
                # No retries inside redis-py: like CeleryPublisher, fail after one attempt and let the
                # listener back off and retry the batch.
                retry=Retry(NoBackoff(), 0),
            )
        return self._client

    def _get_layout(self) -> _Layout:
        if self._layout is None:
            self._layout = _Layout.of(self.app)
        return self._layout


_NO_ARGS: list[Any] = []
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class _Layout:
    """Where messages go and what every message shares, read once from the app's configuration."""

    def __init__(
        self,
        *,
        queue: str,
        queue_key: str,
        event_topics: list[str],
        sent_events: bool,
        origin: str,
        reply_to: str,
    ) -> None:
        self.queue = queue
        self.routing_key = queue
        self.queue_key = queue_key
        self.event_topics = event_topics
        self.sent_events = sent_events
        self.origin = origin
        self.reply_to = reply_to
        self.pid = os.getpid()

    @classmethod
    def of(cls, app: Celery) -> _Layout:
        conf = app.conf
        if not conf.broker_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"PipelinedPublisher needs a Redis broker, not {conf.broker_url!r}")
        if (conf.broker_transport_options or {}).get("global_keyprefix"):
            raise ValueError("PipelinedPublisher does not support broker global_keyprefix")
        if conf.task_routes:
            raise ValueError("PipelinedPublisher sends to the default queue only; task_routes is set")
        queue = conf.task_default_queue
        # Key names as kombu's Redis channel makes them (kombu/transport/redis.py): a message of
        # priority 0 goes to the list named after the queue; fanout messages (events) go to the topic
        # "<fanout prefix><exchange>/<routing key>", the prefix being "/<db>." by default. Worked out
        # here rather than asked of a kombu channel, which would connect to Redis just to say so.
        options = conf.broker_transport_options or {}
        prefix = options.get("fanout_prefix", True)
        if prefix is True:
            prefix = f"/{int(redis.connection.parse_url(conf.broker_url).get('db') or 0)}."
        elif not prefix:
            prefix = ""
        patterns = options.get("fanout_patterns", True)
        topic = f"{prefix}celeryev/{EVENTS_ROUTING_KEY}" if patterns else f"{prefix}celeryev"
        queue_key = queue
        event_topics = [topic]
        return cls(
            queue=queue,
            queue_key=queue_key,
            event_topics=event_topics,
            sent_events=bool(conf.task_send_sent_event),
            origin=anon_nodename(),
            reply_to=app.thread_oid,
        )
