"""Sample writes (users, orders, status changes) and the side effects they must produce.

The plan is pure data, so the end-to-end test, the demo and the fault suite all compare what the
pipeline did with what this module says it had to do.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from bson import Decimal128, ObjectId
from pymongo.database import Database

# Order i walks STATUS_PATHS[i % 4] after its insert as "pending".
STATUS_PATHS: tuple[tuple[str, ...], ...] = (
    (),
    ("paid",),
    ("paid", "shipped"),
    ("paid", "shipped", "delivered"),
)
NOTIFIED_STATUSES = frozenset({"shipped", "delivered"})


@dataclass
class Workload:
    users: list[dict] = field(default_factory=list)
    orders: list[dict] = field(default_factory=list)
    # (order _id, new status) in write order.
    transitions: list[tuple[ObjectId, str]] = field(default_factory=list)

    @property
    def events(self) -> int:
        return len(self.users) + len(self.orders) + len(self.transitions)

    def expected_welcome_recipients(self) -> Counter[str]:
        return Counter(user["email"] for user in self.users)

    def expected_shipping_recipients(self) -> Counter[str]:
        email_of = {user["_id"]: user["email"] for user in self.users}
        user_of = {order["_id"]: order["user_id"] for order in self.orders}
        return Counter(
            email_of[user_of[order_id]]
            for order_id, status in self.transitions
            if status in NOTIFIED_STATUSES
        )

    def expected_status_counts(self) -> Counter[str]:
        """Analytics counters summed over days: each order insert and each status change, once."""
        counts = Counter(order["status"] for order in self.orders)
        counts.update(status for _, status in self.transitions)
        return counts

    @property
    def expected_emails(self) -> int:
        return len(self.users) + sum(self.expected_shipping_recipients().values())


def plan(users: int, orders: int, *, prefix: str = "user") -> Workload:
    """users new users, then orders orders spread over them, each walking its status path."""
    work = Workload()
    for i in range(users):
        work.users.append({"_id": ObjectId(), "email": f"{prefix}{i}@example.test", "name": f"User {i}"})
    for i in range(orders):
        user = work.users[i % users]
        order = {
            "_id": ObjectId(),
            "user_id": user["_id"],
            "status": "pending",
            "total": Decimal128(f"{i}.99"),
        }
        work.orders.append(order)
        work.transitions.extend((order["_id"], status) for status in STATUS_PATHS[i % len(STATUS_PATHS)])
    return work


def apply(db: Database, work: Workload) -> None:
    """Write the plan with ordinary pymongo calls, as an application would."""
    for user in work.users:
        db.users.insert_one(dict(user))
    for order in work.orders:
        db.orders.insert_one(dict(order))
    for order_id, status in work.transitions:
        db.orders.update_one({"_id": order_id}, {"$set": {"status": status}})
