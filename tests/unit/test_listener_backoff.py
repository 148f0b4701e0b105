"""Reconnect/republish backoff: exponential, capped, jittered, reset after success."""

from __future__ import annotations

import pytest

from changeflow.listener.backoff import Backoff


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(base=1.0, cap=8.0, rand=lambda: 1.0)  # no jitter: the ceiling itself
    assert [backoff.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_jitter_stays_between_half_and_full_delay() -> None:
    low = Backoff(base=1.0, cap=8.0, rand=lambda: 0.0)
    assert [low.next_delay() for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    real = Backoff(base=1.0, cap=8.0)
    for _ in range(50):
        assert 0.5 <= real.next_delay() <= 8.0


def test_reset_starts_over() -> None:
    backoff = Backoff(base=1.0, cap=8.0, rand=lambda: 1.0)
    for _ in range(3):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_many_failures_do_not_overflow() -> None:
    backoff = Backoff(base=1.0, cap=30.0, rand=lambda: 1.0)
    backoff.failures = 5000
    assert backoff.next_delay() == 30.0


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (2.0, 1.0)])
def test_invalid_parameters(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base=base, cap=cap)
