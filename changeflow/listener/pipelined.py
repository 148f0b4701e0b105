"""A fast `Publisher`: one pipelined Redis round trip per batch, with the messages `send_task` would send.

`CeleryPublisher` pays, per message, for Celery's `saferepr` of the payload (the `argsrepr` header),
kombu's entity declarations and copies, and one Redis round trip (two with task-sent events). This
publisher sends what `send_task` sends: once per task name it calls `app.send_task` itself with a
producer that only records what it is asked to publish (`_Template`), and keeps that message (headers,
properties, task-sent event, in Celery's order) as JSON with holes for the task id, argsrepr, body and
delivery tag. Tasks whose publish options it does not reproduce (a priority, another queue or exchange,
queue arguments, compression, protocol 1) go through send_task. The body is encoded by the app's task
serializer (kombu's registry: changeflow's orjson encoder, worker/serialization.py, the workers' too),
wrapped in the kombu Redis transport's envelope, and the batch goes out on one connection as `LPUSH`
commands of LPUSH_CHUNK messages packed by hiredis, each written as soon as it is built (Redis stores
one chunk while the next is encoded), the replies read at the end: one wait per batch. Workers consume
the messages unchanged: the bytes are send_task's but for the delivery tag and `argsrepr` (see below;
tests/integration/test_pipelined_publisher.py compares them for each setting that changes them). The
messages of one event share their payload, so its body is encoded once.

Differences from `send_task`, on purpose:
- `argsrepr` (shown by Flower and in worker logs; never read to run the task) is a short summary of
  the event (`_id`, `operationType`, `ns`, `documentKey`) instead of a saferepr of the whole payload,
  which is the most expensive step of `send_task`. `exact_argsrepr=True` restores Celery's.
- No queue/exchange declaration per message: the default queue of Redis needs none (kombu's binding
  sets only matter for non-default exchanges), and workers declare their queues on start.

Task-sent events (`task_send_sent_event`, what Flower shows as SENT before a worker receives the task)
are published in the same round trip, after the messages, with the same fields Celery's event dispatcher
gives them, grouped into one message per batch the way Celery's dispatcher sends buffered events (a list
body on routing key `task.multi`, as workers send their task events): Flower sees the same events on
both paths, for one PUBLISH per batch instead of one per message. Each event's JSON is made from its
template, and the list is those texts joined, as json.dumps would encode the list of events.

Guarantees are those of the `Publisher` protocol: a message the serializer refuses is returned as
`Rejected` (nothing of it is sent); any Redis error raises `BrokerUnavailable` and the caller retries
the whole batch (an LPUSH that did get through is then sent twice, with the same task id, which the
workers' dedup guard absorbs); when `publish` returns, Redis has accepted every other message.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import os
import re
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any

import redis
import redis.exceptions
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from celery.utils.time import utcoffset
from kombu import Queue
from kombu.entity import maybe_delivery_mode
from kombu.serialization import dumps as kombu_dumps
from kombu.serialization import registry
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection
from redis.retry import Retry

from changeflow.listener.publish import (
    BROKER_ERRORS,
    ENCODE_ERRORS,
    BrokerUnavailable,
    CeleryPublisher,
    Message,
    Rejected,
    send_headers,
    task_queue,
)
from changeflow.worker.redis_conn import target_of_app

if TYPE_CHECKING:
    from celery import Celery
    from kombu.clocks import LamportClock

# Values per LPUSH command. Each command is sent as soon as its messages are built, and Redis stores
# one chunk while the next is encoded; a batch ends with the wait for the last chunk only. Small
# enough for that overlap, large enough to keep per-command costs low (measured: 64-512 are alike).
LPUSH_CHUNK = 128
# Task-sent events go out grouped, as Celery's dispatcher sends buffered groups of events.
EVENTS_ROUTING_KEY = "task.multi"
EVENTS_PER_MESSAGE = 1000
# With Sentinel, how long a batch waits for a replica to confirm it (WAIT) before it is retried.
REPLICA_WAIT_MS = 2000
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


def reserve_clock(clock: LamportClock, count: int) -> int:
    """The first of `count` consecutive values of the app's Lamport clock, as `count` forward() calls
    would give them (Celery's dispatcher forwards it once per event), for one lock round."""
    first = clock.forward()
    if count > 1:
        clock.adjust(first + count - 2)  # the clock is now first + count - 1, at least
    return first


def summary_argsrepr(payload: Mapping[str, Any]) -> str:
    """A cheap argsrepr: the identifying fields of the event, in the shape saferepr would print."""
    fields = [label + repr(payload[key]) for key, label in _SUMMARY_LABELS if key in payload]
    more = ", ..." if len(payload) > len(fields) else ""
    return f"[{{{', '.join(fields)}{more}}}]"


_SUMMARY_LABELS = [(key, f"{key!r}: ") for key in SUMMARY_FIELDS]


def batch_argsrepr(payloads: list[Mapping[str, Any]]) -> str:
    """A batch's argsrepr (Flower): how many events, and the first's and the last's summaries."""
    if not payloads:
        return "[[]]"
    ends = [summary_argsrepr(payloads[0])[1:-1]]
    if len(payloads) > 1:
        ends.append(summary_argsrepr(payloads[-1])[1:-1])
    return f"[<{len(payloads)} events> [{', ..., '.join(ends)}]]"


class PipelinedPublisher:
    """Publishes a batch of task messages in one pipelined Redis round trip (see the module doc).

    `app` (the changeflow app the listener loaded) gives the broker URL, the task serializer, the default
    queue, and whether task-sent events are on. `client` replaces the Redis client made from the broker URL.
    """

    def __init__(
        self,
        app: Celery,
        *,
        client: redis.Redis | None = None,
        exact_argsrepr: bool = False,
        delivery_tag: Callable[[], str] | None = None,
    ) -> None:
        self.app = app
        self.exact_argsrepr = exact_argsrepr
        self._delivery_tag = delivery_tag or delivery_tags()
        self._client = client
        self._layout: _Layout | None = None
        self._encoding = "utf-8"  # of task bodies: the layout's, once it is read
        # The task serializer's encoder, from kombu's registry when the layout is read: what
        # registry.dumps() calls, without its per-call lookup and error wrapping (a few microseconds
        # an event; ENCODE_ERRORS covers what the encoder raises).
        self._encode: Callable[[Any], str | bytes] = lambda value: b""
        # (task name, names of its extra headers) -> its template, None for send_task's path.
        self._templates: dict[tuple[str, tuple[str, ...]], _Template | None] = {}
        self._fast: dict[tuple[str, tuple[str, ...]], bool] = {}  # the same keys: sent by this path
        # Sentinel: a batch counts as published once a replica has it too (WAIT), so a failover
        # right after cannot lose it. Set with the client.
        self._wait_replicas = False

    # -- the Publisher protocol ----------------------------------------------------------------
    def publish(self, messages: Sequence[Message]) -> list[Rejected]:
        # Tasks with a queue of their own, or publish options the templates do not reproduce, go
        # through Celery's send_task, which routes them (queue, exchange and routing key as Celery
        # declares them); the fast path covers the default queue.
        fast = self._fast
        kinds = [_kind(m) for m in messages]
        for kind in set(kinds) - fast.keys():
            fast[kind] = task_queue(self.app, kind[0]) is None and self._get_template(kind) is not None
        if not all(fast[kind] for kind in kinds):
            slow = [m for m, kind in zip(messages, kinds, strict=True) if not fast[kind]]
            default = [m for m, kind in zip(messages, kinds, strict=True) if fast[kind]]
            return self._publish_default(default) + CeleryPublisher(self.app).publish(slow)
        return self._publish_default(messages)

    def _publish_default(self, messages: Sequence[Message]) -> list[Rejected]:
        if not messages:
            return []
        try:
            layout = self._get_layout()
            client = self._get_client()
        except (*BROKER_ERRORS, redis.exceptions.RedisError) as exc:
            raise BrokerUnavailable(f"broker unavailable: {exc}") from exc
        sender = _StreamedCommands(client)
        try:
            rejected = self._build_and_send(messages, layout, sender)
            if self._wait_replicas:
                sender.send("WAIT", "1", str(REPLICA_WAIT_MS))
            last = sender.finish()  # raises BrokerUnavailable unless Redis accepted every command
        except BaseException:
            sender.abandon()  # failed half way: the connection's unread replies are out of step
            raise
        if self._wait_replicas and not (isinstance(last, int) and last >= 1):
            # Acknowledged by the master alone, which may die before replicating it: send it again.
            raise BrokerUnavailable(f"no replica confirmed the batch within {REPLICA_WAIT_MS} ms (WAIT)")
        return rejected

    def _build_and_send(
        self, messages: Sequence[Message], layout: _Layout, sender: _StreamedCommands
    ) -> list[Rejected]:
        rejected: list[Rejected] = []
        envelopes: list[str] = []  # built, not sent yet (fewer than LPUSH_CHUNK)
        events: list[str] = []  # each task-sent event already encoded (see _events_message)
        offset = json_number(utcoffset())  # once per batch: it reads the local time zone
        clock = itertools.count(reserve_clock(self.app.clock, len(messages)))
        delivery_tag = self._delivery_tag
        templates = self._templates
        # The messages of one event share their payload object, and so their body and argsrepr.
        shared: object = _NOTHING
        body = argsrepr = ""  # JSON texts of the shared payload's body and argsrepr
        for message in messages:
            try:
                if message.payload is not shared:
                    body, argsrepr = self._body(message.payload), json_string(self._argsrepr(message.payload))
                    shared = message.payload
                task_id = json_string(message.task_id)
                if message.order is None and not message.headers:
                    template = templates[message.task_name, ()]
                    envelope = template.envelope.fill((task_id, argsrepr, body, json_string(delivery_tag())))
                else:
                    # Ordering key and member, trace context: in the headers, as send_task(headers=...).
                    headers = send_headers(message) or {}
                    template = templates[message.task_name, tuple(headers)]
                    texts = (task_id, argsrepr, body, json_string(delivery_tag()))
                    envelope = template.envelope.fill(texts + tuple(json_string(v) for v in headers.values()))
                event = None
                if template.sent_event is not None:
                    # Clock and timestamp per message, as Celery's dispatcher gives each event its own
                    # (an int's and a finite float's JSON text is their repr).
                    event = template.sent_event.fill(
                        (task_id, argsrepr, offset, repr(next(clock)), repr(time.time()))
                    )
            except ENCODE_ERRORS as exc:
                rejected.append(Rejected(message, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
                continue
            envelopes.append(envelope)
            if event is not None:
                events.append(event)
            if len(envelopes) == LPUSH_CHUNK:
                sender.send("LPUSH", layout.queue_key, *envelopes)
                envelopes = []
        if envelopes:
            sender.send("LPUSH", layout.queue_key, *envelopes)
        # After the messages, so an event receiver never sees a task sent before it is in the queue.
        for start in range(0, len(events), EVENTS_PER_MESSAGE):
            grouped = self._events_message(layout, events[start : start + EVENTS_PER_MESSAGE])
            for topic in layout.event_topics:
                sender.send("PUBLISH", topic, grouped)
        return rejected

    def check(self) -> None:
        """ValueError (URL masked) when this publisher cannot work with the app's broker settings.

        For start-up: only configuration is read, nothing connects.
        """
        self._get_layout()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # -- building ------------------------------------------------------------------------------
    def _body(self, payload: dict[str, Any]) -> str:
        """The task body `(args, kwargs, embed)` as send_task encodes it (the app's task serializer,
        from kombu's registry), base64'd as the transport does: the JSON string of the envelope's "body"."""
        data = self._encode(([payload], {}, _EMBED))
        raw = data.encode(self._encoding) if isinstance(data, str) else data
        # What base64.b64encode does, without its Python wrapper; base64 needs no JSON escaping.
        return '"' + binascii.b2a_base64(raw, newline=False).decode("ascii") + '"'

    def _argsrepr(self, payload: dict[str, Any]) -> str:
        if isinstance(payload, list):  # a batched task's events (changeflow/listener/batching.py)
            return batch_argsrepr(payload)
        if self.exact_argsrepr:
            return saferepr(
                [payload], self.app.amqp.argsrepr_maxsize, maxlevels=self.app.conf.task_repr_maxlevels
            )
        return summary_argsrepr(payload)

    def _get_template(self, kind: tuple[str, tuple[str, ...]]) -> _Template | None:
        if kind not in self._templates:
            self._templates[kind] = _Template.of(self.app, self._get_layout(), *kind)
        return self._templates[kind]

    def _events_message(self, layout: _Layout, events: list[str]) -> str:
        """Many events in one message, as Celery's dispatcher sends a buffered group ("task.multi").

        Event receivers (Flower, `celery events`) take a list body as that many events, so Flower
        sees each task-sent event as if it came alone, for one PUBLISH per batch instead of one per
        message. `events` are encoded already: the list is their JSON texts joined as json.dumps
        joins list items.
        """
        listed = "[" + ", ".join(events) + "]"
        body = '"' + base64.b64encode(listed.encode("utf-8")).decode("ascii") + '"'
        return layout.events_envelope.fill((body, json_string(self._delivery_tag())))

    # -- the client -----------------------------------------------------------------------------
    def _get_client(self) -> redis.Redis:
        if self._client is None:
            conf = self.app.conf
            options = conf.broker_transport_options or {}
            timeout = conf.broker_connection_timeout or 4.0
            # The broker as the workers' kombu reads it: TLS checks, Sentinel master (worker/redis_conn.py).
            target = target_of_app(conf)
            self._client = target.client(
                socket_connect_timeout=options.get("socket_connect_timeout", timeout),
                socket_timeout=options.get("socket_timeout", 10.0),
                # No retries inside redis-py: like CeleryPublisher, fail after one attempt and let the
                # listener back off and retry the batch.
                retry=Retry(NoBackoff(), 0),
            )
            self._wait_replicas = target.sentinel
        return self._client

    def _get_layout(self) -> _Layout:
        if self._layout is None:
            self._layout = _Layout.of(self.app)
            self._encode = registry._encoders[self.app.conf.task_serializer].encoder
            self._encoding = self._layout.content[1]
        return self._layout


class _StreamedCommands:
    """Redis commands sent as soon as they are built, their replies read at the end (one connection).

    A pipeline whose sending overlaps the building of its next commands: Redis stores one chunk of
    messages while the publisher encodes the next. `finish()` reads every reply; a Redis error (the
    connection, or an error reply such as OOM or READONLY) raises BrokerUnavailable, and the batch is
    retried whole. After any failure the caller calls `abandon()`: the connection's unread replies
    would be out of step.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._connection: AbstractConnection | None = None
        self._sent = 0

    def send(self, *args: str) -> None:
        with _broker_errors():
            if self._connection is None:
                self._connection = self._pool.get_connection()
            if _pack_command is None:
                self._connection.send_command(*args)  # redis-py's packer
            else:
                self._connection.send_packed_command([_pack_command(args)])
        self._sent += 1

    def finish(self) -> object:
        """Read every reply; returns the last one (None when nothing was sent)."""
        last: object = None
        if self._connection is None:
            return last
        with _broker_errors():
            for _ in range(self._sent):
                last = self._connection.read_response()
        self._pool.release(self._connection)
        self._connection = None
        return last

    def abandon(self) -> None:
        """Drop the connection (if any) with whatever it has not read. Idempotent."""
        if self._connection is not None:
            self._connection.disconnect()
            self._pool.release(self._connection)
            self._connection = None


# hiredis's packer, called directly: redis-py's (even with hiredis) first encodes each argument in Python,
# which costs several times more per message than the packing itself.
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # redis-py's packer then, slower
    _pack_command = None


@contextmanager
def _broker_errors() -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.RedisError, OSError) as exc:
        raise BrokerUnavailable(f"broker unavailable: {exc}") from exc


# -- JSON with holes --------------------------------------------------------------------------------
# A message differs from the next one by a few values (task id, argsrepr, body, delivery tag; in its
# task-sent event, clock and timestamp): the rest of its JSON is encoded once, and each message is
# that text joined around the JSON texts of its own values.

# What json.dumps (ensure_ascii, the default) makes of a str: the same C function.
json_string: Callable[[str], str] = encode_basestring_ascii


def json_number(value: float) -> str:
    """What json.dumps makes of an int or a float (its repr when finite), without json.dumps' cost."""
    kind = type(value)
    if kind is int or (kind is float and math.isfinite(value)):
        return repr(value)
    return json.dumps(value)  # bool, NaN, infinities, subclasses: json's own spelling


class _JsonHoles:
    """The JSON text of a value in which some values vary: encoded once, cut around those values.

    `of(value, holes)`: `value` carries `hole(name)` (a sentinel string) wherever the per-message
    value `name` goes, each a whole JSON value (a string or a number, its key order and everything
    else as json.dumps encodes it). `fill(texts)`, with `texts[i]` the JSON text of `holes[i]` (from
    `json_string` or `json_number`), gives the same text as json.dumps of the value holding them.
    """

    SENTINEL = "\x00changeflow:"  # NUL: in no real value

    def __init__(self, parts: list[str], slots: list[tuple[int, int]]) -> None:
        self.parts = parts  # literal pieces, with a placeholder where each hole goes
        self.slots = slots  # (index in parts, index in the fill values)

    @classmethod
    def hole(cls, name: str) -> str:
        return f"{cls.SENTINEL}{name}\x00"

    @classmethod
    def of(cls, value: Any, holes: Sequence[str]) -> _JsonHoles:
        text = json.dumps(value)
        encoded = {json.dumps(cls.hole(name)): index for index, name in enumerate(holes)}  # quoted
        parts = re.split("(" + "|".join(re.escape(key) for key in encoded) + ")", text)
        slots = [(at, encoded[parts[at]]) for at in range(1, len(parts), 2)]
        # Refuse to make messages that would silently lack a value (a task id, say), or carry a
        # sentinel where a value is part of a longer string.
        missing = set(holes) - {holes[index] for _, index in slots}
        sentinel = json.dumps(cls.SENTINEL)[1:-1]
        if missing or any(sentinel in part for part in parts[0::2]):
            raise ValueError(f"holes {list(holes)} are not whole values of {value!r}")
        return cls(parts, slots)

    def fill(self, texts: Sequence[str]) -> str:
        parts = self.parts.copy()
        for at, index in self.slots:
            parts[at] = texts[index]
        return "".join(parts)


def _kind(message: Message) -> tuple[str, tuple[str, ...]]:
    """What selects a message's template: its task and the names of the headers send_task adds."""
    if message.order is None and not message.headers:
        return message.task_name, ()
    return message.task_name, tuple(send_headers(message) or ())


class _Template:
    """The messages of one task name as `send_task` makes them: its envelope and task-sent event.

    `app.send_task` itself is called once per task name (and once more with the ordering headers),
    with sentinel values for the task id, argsrepr and the ordering headers, and a producer that only
    records what it is asked to publish (`_Recorder`): the headers, properties and publish options
    are Celery's own, with every setting that shapes them (the task's options, time limits,
    ignore_result, the queue's exchange and delivery mode, the task-sent event's fields). What kombu's
    producer and the Redis channel add to them (below) is pinned by
    tests/integration/test_pipelined_publisher.py, byte for byte, for each setting that changes it.
    A task whose publish options ask for more than that (a priority, an expiry, compression, another
    exchange) has no template (`of` gives None) and goes through send_task.
    """

    ENVELOPE_HOLES = ("task_id", "argsrepr", "body", "delivery_tag")
    EVENT_HOLES = ("task_id", "argsrepr", "utcoffset", "clock", "timestamp")
    # What the template reproduces of Producer.publish's arguments (the rest must be absent or None).
    PUBLISH_OPTIONS = frozenset(
        {"exchange", "routing_key", "serializer", "compression", "retry", "retry_policy", "delivery_mode",
         "declare", "headers", "timeout", "confirm_timeout", "correlation_id", "reply_to"}
    )  # fmt: skip

    def __init__(self, envelope: _JsonHoles, sent_event: _JsonHoles | None) -> None:
        self.envelope = envelope
        self.sent_event = sent_event

    @classmethod
    def of(
        cls, app: Celery, layout: _Layout, task_name: str, header_names: tuple[str, ...]
    ) -> _Template | None:
        hole = _JsonHoles.hole
        holes = cls.ENVELOPE_HOLES
        headers = None
        if header_names:  # after the envelope's own holes, in the order send_headers gives them
            headers = {name: hole(f"header:{name}") for name in header_names}
            holes = holes + tuple(f"header:{name}" for name in header_names)
        recorder = _Recorder(app)
        try:
            app.send_task(
                task_name, args=_NO_ARGS, task_id=hole("task_id"), producer=recorder, retry=False,
                add_to_parent=False, headers=headers,
            )  # fmt: skip
        finally:
            recorder.connection.release()
        (body, options), *events = recorder.published
        if not isinstance(body, tuple) or list(body[1:]) != [{}, _EMBED]:
            return None  # not task protocol 2, or a body other than the one _body() encodes
        extra = {key for key in options.keys() - cls.PUBLISH_OPTIONS if options[key] is not None}
        # A queue declared with arguments (x-expires, max priority, a TTL) makes kombu's channel add
        # commands (PEXPIRE) or pick another key.
        declared = [q for q in options["declare"] or () if isinstance(q, Queue)]
        if any(q.queue_arguments or q.expires or q.max_priority or q.message_ttl for q in declared):
            return None
        shape = (options["exchange"], options["routing_key"], options["compression"], options["serializer"])
        if extra or shape != ("", layout.queue, None, app.conf.task_serializer):
            return None
        # The argsrepr of the payload, in the header and the task-sent event (send_task(argsrepr=...)
        # would add it to the message properties too).
        options["headers"]["argsrepr"] = hole("argsrepr")
        properties = {"correlation_id": options["correlation_id"], "reply_to": options["reply_to"]}
        # What kombu's producer and the Redis channel add (Producer.publish, Channel.prepare_message,
        # _inplace_augment_message), for the default exchange and a priority-0 message.
        properties["delivery_mode"] = maybe_delivery_mode(options["delivery_mode"])
        properties["delivery_info"] = {"exchange": "", "routing_key": layout.routing_key}
        properties["priority"] = 0
        properties["body_encoding"] = "base64"
        properties["delivery_tag"] = hole("delivery_tag")
        content_type, content_encoding = layout.content
        envelope = {
            "body": hole("body"),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": options["headers"],
            "properties": properties,
        }
        sent_event = None
        if events:
            ((event, _),) = events
            event.update(args=hole("argsrepr"), utcoffset=hole("utcoffset"), clock=hole("clock"))
            event["timestamp"] = hole("timestamp")
            sent_event = _JsonHoles.of(event, cls.EVENT_HOLES)
        return cls(_JsonHoles.of(envelope, holes), sent_event)


class _Recorder:
    """The producer `_Template.of` gives send_task: it records what it is asked to publish."""

    def __init__(self, app: Celery) -> None:
        self.connection = app.connection_for_write()  # send_task only uses it to wrap errors; never connected
        self.published: list[tuple[Any, dict[str, Any]]] = []

    def publish(self, body: Any, **options: Any) -> None:
        self.published.append((body, options))


_NOTHING = object()
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
        origin: str,
    ) -> None:
        self.queue = queue
        self.routing_key = queue
        self.queue_key = queue_key
        self.event_topics = event_topics
        self.origin = origin
        self.content = ("application/json", "utf-8")  # (content type, encoding) of task bodies
        # The message of a batch's task-sent events, as Celery's dispatcher sends a buffered group.
        self.events_envelope = _JsonHoles.of(
            {
                "body": _JsonHoles.hole("body"),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {"hostname": origin},
                "properties": {
                    "delivery_mode": 1,
                    "delivery_info": {"exchange": "celeryev", "routing_key": EVENTS_ROUTING_KEY},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": _JsonHoles.hole("delivery_tag"),
                },
            },
            ("body", "delivery_tag"),
        )

    @classmethod
    def of(cls, app: Celery) -> _Layout:
        conf = app.conf
        if not conf.broker_url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            scheme = conf.broker_url.partition("://")[0]  # only the scheme: the URL may hold a password
            raise ValueError(
                "PipelinedPublisher needs a Redis broker (redis://, rediss://, unix:// or sentinel://), "
                f"got scheme {scheme!r}"
            )
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
            prefix = f"/{target_of_app(conf).db}."
        elif not prefix:
            prefix = ""
        patterns = options.get("fanout_patterns", True)
        topic = f"{prefix}celeryev/{EVENTS_ROUTING_KEY}" if patterns else f"{prefix}celeryev"
        queue_key = queue
        event_topics = [topic]
        layout = cls(
            queue=queue,
            queue_key=queue_key,
            event_topics=event_topics,
            origin=anon_nodename(),
        )
        # The task serializer's content type and encoding, as send_task would label the body.
        content_type, content_encoding, _ = kombu_dumps(None, serializer=conf.task_serializer)
        layout.content = (content_type, content_encoding)
        return layout
