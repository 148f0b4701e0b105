"""A fast `Publisher`: one pipelined Redis round trip per batch, with the messages `send_task` would send.

`CeleryPublisher` pays, per message, for Celery's `saferepr` of the payload (the `argsrepr` header),
kombu's entity declarations and copies, and one Redis round trip (two with task-sent events). This
publisher builds the same Celery protocol-2 message with `app.amqp.as_task_v2` (the function
`send_task` uses; once per task name, as a template with holes for the task id, argsrepr, body and
delivery tag), serializes the body as the app's task serializer does (kombu's registry, where
worker.serialization registered the BSON types; through an equivalent one-walk encoder, checked byte
for byte against it at first use), wraps it in the kombu Redis transport's envelope and sends the
whole batch with one `LPUSH` in one `pipeline(transaction=False)`. Workers consume the messages
unchanged: same task ids, headers (except `argsrepr`, see below), properties and body. The messages of
one event share their payload, so its body is encoded once.

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
import re
import time
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
        self._utcoffset = 0
        self._fast_json: bool | None = None  # decided on first use (see fast_json_matches)
        self._templates: dict[str, _Template] = {}

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
        last: tuple[Any, bytes, str] | None = None  # (payload, body, argsrepr) of the previous message
        for message in messages:
            try:
                # The messages of one event share their payload object, and so their body.
                if last is None or last[0] is not message.payload:
                    last = (message.payload, self._body(message.payload), self._argsrepr(message.payload))
                envelope, event = self._envelope(layout, message, last[1], last[2])
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
        body = ([payload], {}, _EMBED)
        data: str | bytes | None = None
        if self._fast_json is None:
            self._fast_json = self.app.conf.task_serializer == "json" and fast_json_matches()
        if self._fast_json:
            try:
                data = json.dumps(plain_json(body))
            except _NotPlain:
                data = None  # a type the fast path does not know: the serializer decides (or refuses)
        if data is None:
            _, _, data = kombu_dumps(body, serializer=self.app.conf.task_serializer)
        raw = data.encode(self._get_layout().content[1]) if isinstance(data, str) else data
        return base64.b64encode(raw)

    def _argsrepr(self, payload: dict[str, Any]) -> str:
        if self.exact_argsrepr:
            return saferepr(
                [payload], self.app.amqp.argsrepr_maxsize, maxlevels=self.app.conf.task_repr_maxlevels
            )
        return summary_argsrepr(payload)

    def _envelope(
        self, layout: _Layout, message: Message, body: bytes, argsrepr: str
    ) -> tuple[str, dict[str, Any] | None]:
        template = self._templates.get(message.task_name)
        if template is None:
            template = self._templates[message.task_name] = _Template.of(self.app, layout, message.task_name)
        envelope = template.envelope(
            task_id=message.task_id, argsrepr=argsrepr, body=body, delivery_tag=self._delivery_tag()
        )
        if template.sent_event is None:
            return envelope, None
        event = dict(template.sent_event)  # the keys in Celery's order; the values of this message
        event.update(
            utcoffset=self._utcoffset,
            clock=self.app.clock.forward(),
            uuid=message.task_id,
            root_id=message.task_id,
            args=argsrepr,
            timestamp=time.time(),
        )
        return envelope, event

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


class _Template:
    """The envelope JSON of one task name, from `as_task_v2`'s output, with holes for what varies.

    `as_task_v2` is called once per task name with sentinel values for the task id, argsrepr, body
    and delivery tag; the encoded envelope is cut at the sentinels. A message is then the pieces
    joined around its own values (JSON-escaped): the same bytes as encoding the whole envelope, for
    a fraction of the cost. Whatever Celery puts in the headers, the template has it.
    """

    HOLES = ("task_id", "argsrepr", "body", "delivery_tag")

    def __init__(self, pieces: list[str], holes: list[str], sent_event: dict[str, Any] | None) -> None:
        self.pieces = pieces  # len(holes) + 1 literal pieces around the holes
        self.holes = holes
        self.sent_event = sent_event

    @classmethod
    def of(cls, app: Celery, layout: _Layout, task_name: str) -> _Template:
        sentinel = {hole: f"\x00changeflow:{hole}\x00" for hole in cls.HOLES}
        headers, properties, _, sent_fields = app.amqp.as_task_v2(
            sentinel["task_id"],
            task_name,
            args=_NO_ARGS,  # the body is encoded separately (and shared by the event's messages)
            argsrepr=sentinel["argsrepr"],
            kwargsrepr="{}",
            origin=layout.origin,
            reply_to=layout.reply_to,
            create_sent_event=layout.sent_events,
            ignore_result=None,  # what send_task passes when the task is not given ignore_result
        )
        # What kombu's producer and the Redis channel add (Channel.prepare_message,
        # _inplace_augment_message), for the default exchange and a priority-0 message.
        properties["delivery_mode"] = 2  # persistent: the default delivery mode of task queues
        properties["delivery_info"] = {"exchange": "", "routing_key": layout.routing_key}
        properties["priority"] = 0
        properties["body_encoding"] = "base64"
        properties["delivery_tag"] = sentinel["delivery_tag"]
        content_type, content_encoding = layout.content
        text = json.dumps(
            {
                "body": sentinel["body"],
                "content-encoding": content_encoding,
                "content-type": content_type,
                "headers": headers,
                "properties": properties,
            }
        )
        escaped = {json.dumps(value)[1:-1]: hole for hole, value in sentinel.items()}
        parts = re.split("(" + "|".join(re.escape(key) for key in escaped) + ")", text)
        pieces, holes = parts[0::2], [escaped[part] for part in parts[1::2]]
        sent_event = None
        if sent_fields is not None:
            sent_event = Event(
                "task-sent",
                hostname=layout.origin,
                utcoffset=0,
                pid=layout.pid,
                clock=0,
                **sent_fields,
                queue=layout.queue,
                exchange="",
                routing_key=layout.routing_key,
            )
        return cls(pieces, holes, sent_event)

    def envelope(self, **values: str | bytes) -> str:
        encoded = {
            hole: value.decode("ascii") if isinstance(value, bytes) else json.dumps(value)[1:-1]
            for hole, value in values.items()
        }
        out = [self.pieces[0]]
        for hole, piece in zip(self.holes, self.pieces[1:], strict=True):
            out.append(encoded[hole])
            out.append(piece)
        return "".join(out)


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
        self.content = ("application/json", "utf-8")  # (content type, encoding) of task bodies

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
        layout = cls(
            queue=queue,
            queue_key=queue_key,
            event_topics=event_topics,
            sent_events=bool(conf.task_send_sent_event),
            origin=anon_nodename(),
            reply_to=app.thread_oid,
        )
        # The task serializer's content type and encoding, as send_task would label the body.
        content_type, content_encoding, _ = kombu_dumps(None, serializer=conf.task_serializer)
        layout.content = (content_type, content_encoding)
        return layout


# -- the task body without kombu's Python `default()` hook ----------------------------------------
# Encoding the body is the most expensive step left (half the publisher's time with kombu's encoder:
# a Python default() call per BSON value, after worker.serialization's own walk for Int64). The same
# bytes come out of one walk that replaces each non-JSON value with what the registered encoders
# make of it, then the C encoder. It follows worker.serialization (Int64 kept, Code refused) and
# kombu.utils.json (registered types in registration order, then bytes); anything else (Code, a
# type with __json__, an unknown type) goes to the real serializer, which encodes or refuses it.
# fast_json_matches() checks the result against the real serializer once per process and the fast
# path is only used when they agree byte for byte.


class _NotPlain(Exception):
    """A value the fast encoder leaves to the registered serializer."""


_converters: dict[type, Callable[[Any], Any]] = {}


def plain_json(value: Any) -> Any:
    """`value` with every non-JSON leaf replaced as kombu's json serializer (+ changeflow's) would."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict:
        return {key: plain_json(item) for key, item in value.items()}
    if kind is list or kind is tuple:
        return [plain_json(item) for item in value]
    convert = _converters.get(kind)
    if convert is None:
        convert = _converters[kind] = _converter_for(kind)
    return convert(value)


def _converter_for(kind: type) -> Callable[[Any], Any]:
    from bson import Int64
    from bson.code import Code
    from kombu.utils import json as kombu_json

    if issubclass(kind, dict):
        return lambda value: {key: plain_json(item) for key, item in value.items()}
    if issubclass(kind, list | tuple):
        return lambda value: [plain_json(item) for item in value]
    if issubclass(kind, Int64):
        return lambda value: {"__type__": "int64", "__value__": int(value)}
    if issubclass(kind, Code) or getattr(kind, "__json__", None) is not None:
        return _refuse
    if issubclass(kind, int | float | str):
        return _same  # json encodes these natively, never asking kombu's encoder
    for registered, (marker, encode) in kombu_json._encoders.items():
        if issubclass(kind, registered):
            if marker is None:
                return lambda value, encode=encode: plain_json(encode(value))
            return lambda value, encode=encode, marker=marker: {
                "__type__": marker,
                "__value__": plain_json(encode(value)),
            }
    if issubclass(kind, bytes):
        return _bytes
    return _refuse


def _same(value: Any) -> Any:
    return value


def _refuse(value: Any) -> Any:
    raise _NotPlain


def _bytes(value: bytes) -> dict[str, str]:
    try:
        return {"__type__": "bytes", "__value__": value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"__type__": "base64", "__value__": base64.b64encode(value).decode("utf-8")}


def fast_json_matches() -> bool:
    """Whether plain_json + json.dumps gives what the registered json serializer gives, on every type."""
    import datetime as dt
    import decimal

    from bson import Binary, Decimal128, Int64, ObjectId, Timestamp

    now = dt.datetime(2026, 1, 2, 3, 4, 5, 678901)
    probe = [
        {
            "_id": {"_data": "8263"}, "s": "é\"x", "i": 1, "big": 2**70, "f": 1.5, "b": True, "n": None,
            "oid": ObjectId("65a1b2c3d4e5f60718293a4b"), "dec": Decimal128("1.50"), "i64": Int64(7),
            "ts": Timestamp(1_700_000_000, 3), "bin": Binary(b"\x00\xff", 4), "raw": b"\xff\x00",
            "text": b"abc", "dt": now, "dtz": now.replace(tzinfo=dt.UTC), "d": now.date(), "t": now.time(),
            "pydec": decimal.Decimal("2.5"), "uuid": uuid.UUID(int=5), "list": [1, (2, 3), {"x": [now]}],
        }
    ]  # fmt: skip
    body = (probe, {}, _EMBED)
    try:
        fast = json.dumps(plain_json(body))
    except _NotPlain:
        return False
    _, _, reference = kombu_dumps(body, serializer="json")
    return fast == (reference.decode("utf-8") if isinstance(reference, bytes) else reference)
