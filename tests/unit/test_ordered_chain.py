"""The bounds of an ordered chain (changeflow/worker/ordering.py `chain_may_run`)."""

from __future__ import annotations

import pytest

from changeflow.worker.ordering import chain_may_run


@pytest.mark.parametrize(
    ("ran", "elapsed", "expected"),
    [
        (0, 0.0, True),
        (15, 4.9, True),
        (16, 0.0, False),  # the task cap
        (0, 5.0, False),  # the time cap
    ],
)
def test_a_chain_stops_at_its_task_or_time_cap(ran: int, elapsed: float, expected: bool) -> None:
    assert chain_may_run(ran, elapsed, max_tasks=16, max_seconds=5, soft_time_limit=30) is expected


def test_half_the_soft_time_limit_caps_the_time() -> None:
    # A chained task started then still has half the soft limit before it is interrupted.
    assert chain_may_run(0, 2.9, max_tasks=16, max_seconds=5, soft_time_limit=6)
    assert not chain_may_run(0, 3.0, max_tasks=16, max_seconds=5, soft_time_limit=6)


def test_zero_tasks_turns_chains_off() -> None:
    assert not chain_may_run(0, 0.0, max_tasks=0, max_seconds=5, soft_time_limit=30)
