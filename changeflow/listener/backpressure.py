"""Backpressure: the listener stops reading the change stream while the broker's task queue is full.

Workers that are down or too slow leave task messages piling up in Redis; with nothing to stop it,
the listener would fill a `maxmemory` broker. LISTENER_MAX_QUEUE_LENGTH bounds it: before reading a
batch (and only when it published something since it last looked: an idle stream costs nothing),
the listener asks the broker how many messages wait in the task queue. At the bound or above it
reads nothing more (its checkpoint stays before the unread events: nothing is dropped, a restart
reads them too), looks again after a growing wait (0.05 s doubling up to 1 s), and goes on once the
queue is below 90 % of the bound, so it does not flap around the bound. The queue can exceed the
bound by at most one batch (LISTENER_BATCH_SIZE events times the tasks of an event).

The length is what kombu's Redis transport reports for the default task queue (`queue_declare`'s
message count): the queue's list plus its priority lists (`celery\\x06\\x163`, ...), so any transport
option or future transport kombu knows is counted as the workers see it. Messages a worker holds
(delivered, not acked) are not counted: at most the workers' prefetch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import redis.exceptions

from changeflow.listener.publish import BROKER_ERRORS, BrokerUnavailable

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Connection

RESUME_FRACTION = 0.9  # resume below 90 % of the bound
FIRST_WAIT = 0.05  # seconds before the first look after pausing; doubles each time
MAX_WAIT = 1.0  # seconds between looks at most


def resume_below(limit: int) -> int:
    """The queue length under which a paused listener goes on (hysteresis; at least 1)."""
    return max(1, int(limit * RESUME_FRACTION))


def next_wait(previous: float | None) -> float:
    """Seconds to wait before the next look at a full queue: FIRST_WAIT, doubling, capped at MAX_WAIT."""
    return FIRST_WAIT if previous is None else min(MAX_WAIT, previous * 2)


class Backpressure:
    """The bound on the broker's queue, and when it must be asked again.

    `queue_length` returns the number of waiting messages (raises BrokerUnavailable when it cannot
    tell); `limit` is LISTENER_MAX_QUEUE_LENGTH (at least 1).
    """

    def __init__(self, queue_length: Callable[[], int], limit: int) -> None:
        if limit < 1:
            raise ValueError("LISTENER_MAX_QUEUE_LENGTH must be at least 1 for a bound (0: none)")
        self.queue_length = queue_length
        self.limit = limit
        self.resume_below = resume_below(limit)
        self._unchecked = True  # something may have been published since the last look

    def published(self, count: int) -> None:
        """The listener published `count` messages: the next batch looks at the queue first."""
        if count:
            self._unchecked = True

    def full(self) -> int | None:
        """The queue's length when it is at the bound or above (pause), else None.

        Asks the broker only when something was published since the last look that found room.
        """
        if not self._unchecked:
            return None
        queued = self.queue_length()
        if queued >= self.limit:
            return queued
        self._unchecked = False
        return None


class BrokerQueueLength:
    """Messages waiting in `queues` (default: `app`'s default task queue), summed, as kombu's transport
    counts them (see the module doc). The listener passes every queue its routes' tasks go to.

    Keeps one broker connection; after a broker error it is dropped and the error raised as
    BrokerUnavailable (the listener backs off and tries again with a new one).
    """

    def __init__(self, app: Celery, queues: Sequence[str] | None = None) -> None:
        self.app = app
        self.queues = list(queues) if queues else [app.conf.task_default_queue]
        self._connection: Connection | None = None

    def __call__(self) -> int:
        try:
            if self._connection is None:
                self._connection = self.app.connection_for_write()
            # Declaring a queue changes nothing on Redis (workers declare it too); the reply's count
            # is kombu's sum over the queue's priority lists.
            channel = self._connection.default_channel
            return sum(
                int(channel.queue_declare(queue=queue, durable=True, auto_delete=False).message_count)
                for queue in self.queues
            )
        except (*BROKER_ERRORS, redis.exceptions.RedisError) as exc:
            self.close()
            raise BrokerUnavailable(f"broker unavailable (queue length): {exc}") from exc

    def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            # A connection that broke may fail to close as well; it is dropped anyway.
            with contextlib.suppress(Exception):
                connection.release()
