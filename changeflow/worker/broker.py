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
broker's queues. kombu's Sentinel transport (`sentinel://`) builds its clients the same way (its channel
is a subclass of the Redis channel whose pool is the current master's): it gets the same treatment
under the `sentinel` alias. After a failover kombu drops the pool and the next operation builds a
client around the new one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis

SCHEMES = {"redis": "Transport", "rediss": "Transport", "sentinel": "SentinelTransport"}


class _OneClient:
    """Mixin for kombu Redis channels: one synchronous client per connection pool."""

    _sync_client: redis.Redis | None = None
    pool: redis.ConnectionPool  # kombu's channel provides it, and _create_client()

    @contextmanager
    def conn_or_acquire(self, client: redis.Redis | None = None) -> Iterator[redis.Redis]:
        if client:
            yield client
            return
        if self._pool is None and getattr(self.connection, "client", None) is None:  # type: ignore[attr-defined]
            # The kombu connection is closed (after a broker error) and the channel, closing, tries to
            # restore its unacked messages: nothing to connect with. kombu's own path fails here with
            # an AttributeError that stops the worker ("Unrecoverable error"); a connection error is
            # what closing ignores. The messages stay in the broker's unacked hash and come back
            # after the visibility timeout.
            raise redis.ConnectionError("broker connection closed")
        pool = self.pool  # kombu makes a new pool after _disconnect_pools(); follow it
        cached = self._sync_client
        if cached is None or cached.connection_pool is not pool:
            cached = self._sync_client = self._create_client()  # type: ignore[attr-defined]
        yield cached


class Channel(_OneClient, kombu_redis.Channel):  # type: ignore[misc]
    pass


class SentinelChannel(_OneClient, kombu_redis.SentinelChannel):  # type: ignore[misc]
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def install() -> None:
    """Make redis://, rediss:// and sentinel:// broker URLs use these transports. Idempotent."""
    for scheme, transport in SCHEMES.items():
        kombu_transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:{transport}"
        kombu_transport._transport_cache.pop(scheme, None)  # resolved before install(): resolve again
