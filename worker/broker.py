"""kombu's Redis transport, with one synchronous client per channel instead of one per command.

kombu's Redis channel builds a new `redis.Redis` object (around the same connection pool) for every
synchronous operation: each task event published, each message acked, each message recorded as
unacked. With redis-py 8 that object is costly to build (a case-insensitive copy of ~200 response
callbacks): measured, a quarter of a Celery worker's main-process CPU went into it
(docs/performance.md). This channel keeps the client it built while the channel's pool stays the
same; when kombu replaces the pool (after a connection error), the next operation builds a new one.
Nothing else changes: the same commands go to the same pool, so messages, acks and events are
kombu's own.

`install()` registers it under kombu's own `redis` and `rediss` aliases rather than naming it in
`broker_transport`: connection URLs keep their redis:// scheme, which Flower reads to find the
broker's queues.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis

SCHEMES = ("redis", "rediss")


class Channel(kombu_redis.Channel):
    _sync_client: redis.Redis | None = None

    @contextmanager
    def conn_or_acquire(self, client: redis.Redis | None = None) -> Iterator[redis.Redis]:
        if client:
            yield client
            return
        pool = self.pool  # kombu makes a new pool after _disconnect_pools(); follow it
        cached = self._sync_client
        if cached is None or cached.connection_pool is not pool:
            cached = self._sync_client = self._create_client()
        yield cached


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make redis:// and rediss:// broker URLs use this transport. Idempotent."""
    for scheme in SCHEMES:
        kombu_transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        kombu_transport._transport_cache.pop(scheme, None)  # resolved before install(): resolve again
