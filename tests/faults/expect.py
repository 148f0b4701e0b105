"""The effects a scenario must produce, compared with what the pipeline did.

Like harness.effects.compare, but from plain counters, so a scenario can add the legitimate effects
of its bad documents (a user without an email still gets a profile, an order of a missing user is
still counted) and leave out the events of a recorded history gap.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from harness.effects import Comparison, Effects
from harness.workload import Workload


@dataclass
class Expected:
    welcome: Counter[str] = field(default_factory=Counter)  # recipient -> welcome emails
    shipping: Counter[str] = field(default_factory=Counter)  # recipient -> shipping emails
    profiles: Counter[object] = field(default_factory=Counter)  # user _id -> profile documents
    status_counts: Counter[str] = field(default_factory=Counter)  # analytics, summed over days

    @classmethod
    def of(cls, work: Workload) -> Expected:
        return cls(
            welcome=work.expected_welcome_recipients(),
            shipping=work.expected_shipping_recipients(),
            profiles=Counter({user["_id"]: 1 for user in work.users}),
            status_counts=work.expected_status_counts(),
        )

    def __add__(self, other: Expected) -> Expected:
        return Expected(
            self.welcome + other.welcome,
            self.shipping + other.shipping,
            self.profiles + other.profiles,
            self.status_counts + other.status_counts,
        )

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in (self.welcome, self.shipping, self.profiles, self.status_counts))


def compare(expected: Expected, effects: Effects) -> Comparison:
    """Each expected effect counted as observed once: what is missing is lost, what is extra doubled.

    Extra profiles and analytics counts are doubled database effects; extra emails are counted by
    Message-ID at the SMTP sink (Effects.doubled_emails), the way a recipient would see them.
    """
    pairs: list[tuple[Counter, Counter, bool]] = [
        (expected.welcome, effects.welcome, False),
        (expected.shipping, effects.shipping, False),
        (expected.profiles, effects.profiles, True),
        (expected.status_counts, effects.status_counts, True),
    ]
    total = observed = lost = doubled_db = 0
    for want, got, database in pairs:
        for key, count in want.items():
            total += count
            observed += min(count, got.get(key, 0))
            lost += max(0, count - got.get(key, 0))
        if database:
            doubled_db += sum(max(0, count - want.get(key, 0)) for key, count in got.items())
    return Comparison(total, observed, lost, doubled_db, effects.doubled_emails)
