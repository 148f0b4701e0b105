"""Per-key ordering: which task of a key may run now, and the tasks parked behind it (Redis).

For a task declared with `ordered_by`, the listener adds each message's member (its change event's
resume token `_data`, which sorts as a string in stream order) to the sorted set of its (task, key)
before publishing it (`register`). A worker then runs a message only while its member is the lowest
of that set (`gate`); otherwise the message is parked in the key's hash (stored, then acked). When
the head ends (done, duplicate, dead letter), `advance` removes it and returns the new head's parked
message, which the worker runs inline (a chain, changeflow/worker/idempotent.py) or publishes again,
before its own message is acked. See docs/ordering.md.

Keys, both deleted by Redis when they empty (all scores are 0, so a set orders by member bytes):
- `changeflow:order:<task>\\n<key>` sorted set: the members not finished yet, in stream order;
- `changeflow:parked:<task>\\n<key>` hash: member -> the parked message (kombu-serialized).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import redis

from changeflow.worker.settings import Settings

KEY_HEADER = "changeflow_order_key"  # the message's ordering key (a canonical string)
MEMBER_HEADER = "changeflow_order_member"  # its place in the key's order (the resume token's _data)
QUEUE_PREFIX = "changeflow:order:"
PARKED_PREFIX = "changeflow:parked:"
# How many still-pending members a dead letter lists (the rest are counted).
RAN_PAST_LIMIT = 100

# 0: not in the set (finished already, or the set was lost): run; 1: the head: run (and drop a parked
# copy of itself, unless ARGV[3] is '1': a run inline in a chain, whose parked copy is the only stored
# one until it ends); 2: not the head: parked; 3: not the head, and no message given (ARGV[2] empty):
# call again with it. One script, so no head can finish between look and park; the message is only
# built (serialized) when the cheap first call says it must be parked.
_GATE = """
if not redis.call('zscore', KEYS[1], ARGV[1]) then return 0 end
local head = redis.call('zrange', KEYS[1], 0, 0)[1]
if head == ARGV[1] then
  if ARGV[3] ~= '1' then redis.call('hdel', KEYS[2], ARGV[1]) end
  return 1
end
if ARGV[2] == '' then return 3 end
redis.call('hset', KEYS[2], ARGV[1], ARGV[2])
return 2
"""
# Remove the member and a parked copy of it (no-ops when gone already) and return the new head and its
# parked message if it has one. The parked message stays in the hash until its copy passes the gate
# (or, run inline, until it ends), so a worker dying before it published or ran it loses nothing: its
# redelivery advances again and gets it again.
_ADVANCE = """
redis.call('zrem', KEYS[1], ARGV[1])
redis.call('hdel', KEYS[2], ARGV[1])
local head = redis.call('zrange', KEYS[1], 0, 0)[1]
if not head then return {} end
local parked = redis.call('hget', KEYS[2], head)
if not parked then return {head} end
return {head, parked}
"""


class Order(NamedTuple):
    """Where a message stands in its key's order."""

    key: str
    member: str


class Gate(enum.Enum):
    """What `OrderBook.gate` decided."""

    RUN = 0  # not waiting in the set (finished before, or the set is gone): the guard decides
    HEAD = 1  # first of its key: run
    PARKED = 2  # an earlier task of the key has not ended: stored, to be published again by it
    MUST_PARK = 3  # as PARKED, but no message was given: nothing stored, call again with it


class Advanced(NamedTuple):
    """The key's head after an advance, and its parked message when it waits for a copy (else None)."""

    head: str | None
    parked: bytes | None


_last: list[OrderBook] = []


def queue_key(task_name: str, key: str) -> str:
    return f"{QUEUE_PREFIX}{task_name}\n{key}"


def parked_key(task_name: str, key: str) -> str:
    return f"{PARKED_PREFIX}{task_name}\n{key}"


def order_headers(order: Order) -> dict[str, str]:
    return {KEY_HEADER: order.key, MEMBER_HEADER: order.member}


class OrderBook:
    """The ordering sets and parked messages. Pass any redis client (tests use a private server)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._gate = client.register_script(_GATE)
        self._advance = client.register_script(_ADVANCE)

    @classmethod
    def of(cls, client: redis.Redis) -> OrderBook:
        """The book on `client`, made once per client (the worker's dedup store client)."""
        book = _last[0] if _last else None
        if book is None or book.client is not client:
            book = cls(client)
            _last[:] = [book]  # one slot: the dedup store's client changes only on a reset
        return book

    @classmethod
    def from_settings(cls, settings: Settings) -> OrderBook:
        # The dedup store's Redis: one place holds both what is done and what may run.
        return cls(settings.redis_target("redis_url").client(socket_timeout=10, socket_connect_timeout=5))

    def register(self, entries: Iterable[tuple[str, Order]]) -> int:
        """Add (task name, order) members to their sets in one round trip; idempotent (ZADD)."""
        by_set: dict[str, list[str]] = {}
        for task_name, order in entries:
            by_set.setdefault(queue_key(task_name, order.key), []).append(order.member)
        if not by_set:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for name, members in by_set.items():
            pipe.zadd(name, dict.fromkeys(members, 0))
        pipe.execute()
        return sum(len(m) for m in by_set.values())

    def gate(
        self,
        task_name: str,
        order: Order,
        parked_message: bytes | Callable[[], bytes],
        *,
        keep_parked: bool = False,
    ) -> Gate:
        """Run now, or park the message behind the key's head (atomic); RUN, HEAD or PARKED.

        `parked_message` may be a function making it: called only when the message must be parked.
        `keep_parked`: a head keeps its parked copy (a run inline, with no message of its own).
        """
        if callable(parked_message):
            found = self._gate_once(task_name, order, b"", keep_parked)
            if found is not Gate.MUST_PARK:
                return found
            parked_message = parked_message()
        return self._gate_once(task_name, order, parked_message, keep_parked)

    def _gate_once(self, task_name: str, order: Order, parked_message: bytes, keep_parked: bool) -> Gate:
        found = self._gate(
            keys=[queue_key(task_name, order.key), parked_key(task_name, order.key)],
            args=[order.member, parked_message, "1" if keep_parked else "0"],
        )
        return Gate(int(found))

    def advance(self, task_name: str, order: Order) -> Advanced:
        """Remove the member (idempotent); the new head and its parked message, if parked (atomic)."""
        found = self._advance(
            keys=[queue_key(task_name, order.key), parked_key(task_name, order.key)], args=[order.member]
        )
        head = _text(found[0]) if found else None
        parked = found[1] if len(found) > 1 else None
        return Advanced(head, parked if isinstance(parked, bytes) or parked is None else str(parked).encode())

    def pending(self, task_name: str, order: Order, limit: int = RAN_PAST_LIMIT) -> tuple[list[str], int]:
        """The members of the key after `order.member` (up to `limit`) and how many there are in all."""
        name = queue_key(task_name, order.key)
        low = "(" + order.member
        pipe = self.client.pipeline(transaction=False)
        pipe.zrangebylex(name, low, "+", start=0, num=limit)
        pipe.zlexcount(name, low, "+")
        members, count = pipe.execute()
        return [_text(m) for m in members], int(count)

    def members(self, task_name: str, key: str) -> list[str]:
        return [_text(m) for m in self.client.zrange(queue_key(task_name, key), 0, -1)]

    def parked(self, task_name: str, key: str) -> dict[str, bytes]:
        return {_text(k): v for k, v in self.client.hgetall(parked_key(task_name, key)).items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def chain_may_run(
    ran: int, elapsed: float, *, max_tasks: int, max_seconds: float, soft_time_limit: float
) -> bool:
    """Whether a chain that ran `ran` tasks inline, `elapsed` s after its head started, runs one more.

    The head's time limits cover the whole chain (one job of the pool): stopping at half the soft
    limit leaves a chained task at least the other half before the soft limit interrupts it.
    """
    return ran < max_tasks and elapsed < min(float(max_seconds), soft_time_limit / 2)
