"""The `--rate` limit (pure): a token bucket, and how to cut a batch so it is published evenly."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

# How much of a second one publish may use up at most: at 1,000 events/s a batch goes out in
# pieces of 100, so the broker sees a steady flow instead of a burst and a pause.
SLICE_SECONDS = 0.1


class TokenBucket:
    """`rate` tokens per second, at most `capacity` saved up; `reserve(n, now)` says how long to wait.

    A reservation larger than what is there leaves the bucket in debt: the caller waits until the
    debt is paid, so the average stays at `rate` whatever the sizes asked for. `now` is a monotonic
    clock reading (the caller's), so the bucket itself never reads a clock or sleeps.
    """

    def __init__(self, rate: float, now: float, capacity: float | None = None) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        self.rate = float(rate)
        self.capacity = float(capacity) if capacity is not None else max(1.0, self.rate * SLICE_SECONDS)
        self.tokens = self.capacity
        self.updated = now

    def reserve(self, count: int, now: float) -> float:
        """Take `count` tokens; the seconds to wait before using them (0.0: go now)."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = now
        self.tokens -= count
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def slice_size(batch: int, rate: float | None) -> int:
    """How many events one publish carries: the whole batch, or with a rate what SLICE_SECONDS allows."""
    if rate is None:
        return batch
    return max(1, min(batch, math.ceil(rate * SLICE_SECONDS)))


def slices(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """`items` cut into consecutive pieces of `size` (the last one shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
