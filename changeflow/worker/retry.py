"""The retry policy: exponential backoff with full jitter, capped, for a span of time (transient errors)."""

from __future__ import annotations

import random

# The first retry waits up to BACKOFF_BASE seconds, each further one doubles the ceiling.
BACKOFF_BASE = 2.0
# Past this many doublings every ceiling is the cap anyway; bounding the exponent keeps the float
# finite for the thousands of retries a long budget with a short cap can make.
MAX_DOUBLINGS = 60
# A delivery that finds another delivery of its key running waits a little and looks again.
LEASE_RETRY_DELAY = (1.0, 5.0)


def retry_delay(retries: int, maximum: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `retries + 1`: uniform in [0, min(maximum, base * 2**retries)].

    Full jitter spreads the retries of many tasks that failed together (an SMTP or MongoDB outage),
    so they do not come back as one thundering herd.
    """
    ceiling = min(maximum, BACKOFF_BASE * 2 ** min(max(retries, 0), MAX_DOUBLINGS))
    return (rng or random).uniform(0, ceiling)


def may_retry(
    *, first_attempt_at: float, now: float, retries: int, retry_for_seconds: float, max_retries: int | None
) -> bool:
    """Whether a transient failure at `now` is retried rather than dead-lettered "retries_exhausted".

    Retried while less than `retry_for_seconds` (TASK_RETRY_FOR_SECONDS) passed since the task's first
    attempt, and, when `max_retries` (TASK_MAX_RETRIES) is set, while fewer retries were made. Any
    failing attempt before the budget ends is retried, so every outage shorter than the budget ends
    with the task run, however its retries fall.
    """
    if max_retries is not None and retries >= max_retries:
        return False
    return now - first_attempt_at < retry_for_seconds


def lease_retry_delay(rng: random.Random | None = None) -> float:
    return (rng or random).uniform(*LEASE_RETRY_DELAY)
