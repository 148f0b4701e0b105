"""What the pipeline actually did: emails at the SMTP sink, profiles, analytics, dead letters.

Compared with harness.workload's expectations by the end-to-end test, the demo and the fault suite.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from email.utils import parseaddr

from pymongo.database import Database

from harness.smtp_sink import SmtpSink
from harness.workload import Workload

WELCOME_SUBJECT = "Welcome to changeflow"


@dataclass
class Effects:
    welcome: Counter[str] = field(default_factory=Counter)  # recipient -> emails
    shipping: Counter[str] = field(default_factory=Counter)
    message_ids: Counter[str] = field(default_factory=Counter)
    profiles: Counter[object] = field(default_factory=Counter)  # user _id -> profile documents
    status_counts: Counter[str] = field(default_factory=Counter)  # summed over days
    dead_letters: list[dict] = field(default_factory=list)

    @property
    def emails(self) -> int:
        return sum(self.message_ids.values())

    @property
    def doubled_emails(self) -> int:
        """Emails received more than once (same Message-ID), counting each extra copy."""
        return sum(count - 1 for count in self.message_ids.values() if count > 1)


def observe(db: Database, sink: SmtpSink) -> Effects:
    effects = Effects()
    for message in list(sink.messages):
        recipient = parseaddr(str(message["To"]))[1]
        effects.message_ids[str(message["Message-ID"])] += 1
        if str(message["Subject"]) == WELCOME_SUBJECT:
            effects.welcome[recipient] += 1
        else:
            effects.shipping[recipient] += 1
    for profile in db.profiles.find({}, {"_id": 1}):
        effects.profiles[profile["_id"]] += 1
    for counter in db.order_analytics.find({}, {"status": 1, "count": 1}):
        effects.status_counts[counter["status"]] += counter["count"]
    effects.dead_letters = list(db.changeflow_dead_letters.find())
    return effects


@dataclass
class Comparison:
    """Effects expected from a workload against those observed (per kind, no double counting)."""

    expected: int
    observed: int
    lost: int
    doubled_db: int
    doubled_emails: int

    @property
    def complete(self) -> bool:
        return self.lost == 0


def compare(work: Workload, effects: Effects) -> Comparison:
    """Count each expected effect as observed once; what is missing is lost, what is extra doubled."""
    expected_sets: list[tuple[Counter, Counter]] = [
        (work.expected_welcome_recipients(), effects.welcome),
        (work.expected_shipping_recipients(), effects.shipping),
        (Counter({user["_id"]: 1 for user in work.users}), effects.profiles),
        (work.expected_status_counts(), effects.status_counts),
    ]
    expected = observed = lost = 0
    doubled_db = 0
    for index, (want, got) in enumerate(expected_sets):
        for key, count in want.items():
            expected += count
            observed += min(count, got.get(key, 0))
            lost += max(0, count - got.get(key, 0))
        extra = sum(max(0, got.get(key, 0) - want.get(key, 0)) for key in got)
        if index >= 2:  # profiles and counters are database effects
            doubled_db += extra
    return Comparison(expected, observed, lost, doubled_db, effects.doubled_emails)
