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


# Retried with exponential backoff and jitter, up to TASK_MAX_RETRIES. Note that every
# smtplib.SMTPException is an OSError, so OSError as a whole is deliberately not listed.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientTaskError,
    ConnectionError,
    TimeoutError,
    smtplib.SMTPServerDisconnected,
    smtplib.SMTPConnectError,
    pymongo.errors.ConnectionFailure,  # includes AutoReconnect, NetworkTimeout, NotPrimaryError
    pymongo.errors.WTimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    SoftTimeLimitExceeded,  # the task ran out of time: maybe a slow dependency, try again
)
