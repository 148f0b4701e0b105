"""How long to wait before the next attempt after a failure: exponential, capped, jittered."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays of base * 2**n seconds up to `cap`, drawn uniformly from [delay/2, delay].

    The jitter keeps a fleet of listeners (or one listener and its broker) from retrying in
    lock-step after a shared outage; the lower bound keeps the delay from collapsing to zero.
    """

    def __init__(
        self, base: float = 0.5, cap: float = 30.0, rand: Callable[[], float] = random.random
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"need 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self.rand = rand
        self.failures = 0

    def next_delay(self) -> float:
        """The wait before the next attempt; each call counts one more failure."""
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 32))  # no float overflow
        self.failures += 1
        return ceiling / 2 + self.rand() * ceiling / 2

    def reset(self) -> None:
        """An attempt succeeded: the next failure starts from `base` again."""
        self.failures = 0
