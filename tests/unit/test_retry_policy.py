from __future__ import annotations

import random

from changeflow.worker.retry import BACKOFF_BASE, LEASE_RETRY_DELAY, lease_retry_delay, may_retry, retry_delay


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


def test_a_long_budget_with_a_short_cap_never_overflows() -> None:
    # TASK_RETRY_FOR_SECONDS=3600 with RETRY_BACKOFF_MAX=2 makes thousands of retries.
    for retries in (1023, 1024, 5000, 10**6):
        assert 0 <= retry_delay(retries, 2) <= 2


def test_retried_within_the_time_budget_only() -> None:
    base = {"first_attempt_at": 1000.0, "retries": 40, "retry_for_seconds": 3600, "max_retries": None}
    assert may_retry(now=1000.0, **base)
    assert may_retry(now=4599.9, **base)  # 40 retries: a count never ends the budget by itself
    assert not may_retry(now=4600.0, **base)
    assert not may_retry(now=9999.0, **base)


def test_task_max_retries_is_an_extra_cap_when_set() -> None:
    base = {"first_attempt_at": 1000.0, "now": 1010.0, "retry_for_seconds": 3600}
    assert may_retry(retries=1, max_retries=2, **base)
    assert not may_retry(retries=2, max_retries=2, **base)
    assert not may_retry(retries=0, max_retries=0, **base)  # 0: dead letter at the first transient error
    assert may_retry(retries=10**4, max_retries=None, **base)
