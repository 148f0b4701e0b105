from __future__ import annotations

import random

from worker.retry import BACKOFF_BASE, LEASE_RETRY_DELAY, lease_retry_delay, retry_delay


def test_backoff_ceiling_doubles_then_caps() -> None:
    rng = random.Random(1)
    for retries in range(12):
        ceiling = min(300, BACKOFF_BASE * 2**retries)
        delays = [retry_delay(retries, 300, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spans the whole range, not a constant


def test_jitter_spreads_simultaneous_retries() -> None:
    delays = {round(retry_delay(5, 300), 3) for _ in range(50)}
    assert len(delays) > 40


def test_lease_retry_delay_is_short() -> None:
    low, high = LEASE_RETRY_DELAY
    assert all(low <= lease_retry_delay() <= high for _ in range(100))
