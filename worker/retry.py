"""The retry policy: exponential backoff with full jitter, capped, for TRANSIENT_ERRORS."""

from __future__ import annotations

import random

# The first retry waits up to BACKOFF_BASE seconds, each further one doubles the ceiling.
BACKOFF_BASE = 2.0
# A delivery that finds another delivery of its key running waits a little and looks again.
LEASE_RETRY_DELAY = (1.0, 5.0)


def retry_delay(retries: int, maximum: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `retries + 1`: uniform in [0, min(maximum, base * 2**retries)].

    Full jitter spreads the retries of many tasks that failed together (an SMTP or MongoDB outage),
    so they do not come back as one thundering herd.
    """
    ceiling = min(maximum, BACKOFF_BASE * 2 ** max(retries, 0))
    return (rng or random).uniform(0, ceiling)


def lease_retry_delay(rng: random.Random | None = None) -> float:
    return (rng or random).uniform(*LEASE_RETRY_DELAY)
