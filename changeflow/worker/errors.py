"""The outcomes a task body can signal besides success, and the errors worth retrying."""

from __future__ import annotations

import smtplib

import pymongo.errors
import redis.exceptions
from celery.exceptions import SoftTimeLimitExceeded


class PermanentTaskError(Exception):
    """Retrying cannot help (a user without an email, an order pointing at a missing user).

    The guard records a dead letter and does not mark the key done, so a replay after the data
    was fixed runs the task again.
    """


class TransientTaskError(Exception):
    """Retrying later may help, for failures no library exception expresses (an SMTP 4xx reply)."""


class Skip(Exception):
    """The event needs no effect from this task (an order status that sends no mail).

    Logged at INFO and the key is marked done: nothing was wrong, and nothing is left to do.
    """


# Retried with exponential backoff and jitter for TASK_RETRY_FOR_SECONDS. Note that every
# smtplib.SMTPException is an OSError, so OSError as a whole is deliberately not listed.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientTaskError,
    ConnectionError,
    TimeoutError,
    smtplib.SMTPServerDisconnected,
    smtplib.SMTPConnectError,
    pymongo.errors.ConnectionFailure,  # includes AutoReconnect, NetworkTimeout, NotPrimaryError
    pymongo.errors.WTimeoutError,
    redis.exceptions.ConnectionError,  # includes BusyLoadingError (LOADING)
    redis.exceptions.TimeoutError,
    # Replies of a Redis that answers but cannot take the write now: maxmemory with noeviction
    # (OOM), a replica after a failover (READONLY), a cluster or Sentinel in transition.
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,  # includes MasterDownError (MASTERDOWN)
    SoftTimeLimitExceeded,  # the task ran out of time: maybe a slow dependency, try again
)

# Redis error codes (the reply's first word) that say "not now" and that redis-py raises as a plain
# ResponseError (it maps OOM, READONLY, LOADING, TRYAGAIN, CLUSTERDOWN, MASTERDOWN to the classes above).
TRANSIENT_REDIS_REPLIES = frozenset(
    {
        "OOM",
        "READONLY",
        "LOADING",
        "BUSY",  # a script or module command is running (SCRIPT KILL / it ends)
        "MASTERDOWN",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "NOREPLICAS",  # min-replicas-to-write not met
        "MISCONF",  # the last RDB save failed (disk full): writes refused until it succeeds
    }
)


def redis_reply_code(exc: BaseException) -> str | None:
    """The error code of a Redis error reply ("BUSY", "NOREPLICAS", ...), or None.

    Also finds the code of an error raised inside a Lua script (`... @user_script:3: -OOM ...`).
    """
    if not isinstance(exc, redis.exceptions.ResponseError):
        return None
    text = str(exc)
    first = text.split(" ", 1)[0]
    if first in TRANSIENT_REDIS_REPLIES:
        return first
    for code in TRANSIENT_REDIS_REPLIES:
        if f"-{code} " in text or f": {code} " in text:
            return code
    return first or None


def is_transient(exc: BaseException) -> bool:
    """Whether a later attempt may succeed: the one place that decides retry vs. dead letter."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return redis_reply_code(exc) in TRANSIENT_REDIS_REPLIES
