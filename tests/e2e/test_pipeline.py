"""End to end with real processes: redis-server, MongoDB (test server, or MONGODB_URI), an SMTP sink,
`python -m listener` and two `celery -A worker worker` processes. Writes go through plain pymongo."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from bson import ObjectId
from bson.regex import Regex

from harness.effects import compare, observe
from harness.pipeline import LocalPipeline, wait_until
from harness.workload import apply, plan

pytestmark = pytest.mark.e2e


def test_100_users_and_100_orders_produce_each_effect_exactly_once() -> None:
    work = plan(users=100, orders=100)
    with LocalPipeline(workers=2) as pipeline:
        assert pipeline.sink is not None
        apply(pipeline.db, work)

        def done() -> bool:
            return compare(work, observe(pipeline.db, pipeline.sink)).lost == 0

        assert wait_until(done, timeout=120), pipeline.logs()
        # Give late duplicates a chance to show up before counting exactly.
        time.sleep(2)
        effects = observe(pipeline.db, pipeline.sink)
        logs = pipeline.logs()

    assert effects.welcome == work.expected_welcome_recipients()
    assert sum(effects.welcome.values()) == 100
    assert effects.shipping == work.expected_shipping_recipients()
    assert sum(effects.shipping.values()) == 75  # orders 2 and 3 mod 4: one and two notified transitions
    assert len(effects.profiles) == 100 and set(effects.profiles.values()) == {1}
    assert effects.status_counts == work.expected_status_counts()
    assert effects.doubled_emails == 0
    assert effects.dead_letters == []
    comparison = compare(work, effects)
    assert (comparison.lost, comparison.doubled_db, comparison.doubled_emails) == (0, 0, 0)
    # 100 welcome emails, 75 shipping emails, 100 profiles, 100 inserts + 150 status changes counted.
    assert comparison.observed == comparison.expected == 100 + 75 + 100 + 250
    assert "Traceback" not in logs, logs


def test_bad_input_ends_in_dead_letters_with_reasons_and_good_input_goes_through() -> None:
    good = plan(users=3, orders=0, prefix="good")
    no_email = {"_id": ObjectId(), "name": "No Email"}
    orphan_order = {"_id": ObjectId(), "user_id": ObjectId(), "status": "pending", "total": 5}
    # A Regex used to be refused by the serializer (an "unpublishable" dead letter): a BSON value like
    # any other now, its user gets an email and a profile.
    regex_user = {"_id": ObjectId(), "email": "regex@example.test", "name": "R", "pattern": Regex("^a")}
    with LocalPipeline(workers=2) as pipeline:
        assert pipeline.sink is not None and pipeline.listener is not None
        db = pipeline.db
        db.users.insert_one(no_email)
        db.orders.insert_one(orphan_order)
        db.orders.update_one({"_id": orphan_order["_id"]}, {"$set": {"status": "shipped"}})
        db.users.insert_one(regex_user)
        apply(db, good)

        def settled() -> bool:
            effects = observe(db, pipeline.sink)
            return sum(effects.welcome.values()) >= 4 and len(effects.dead_letters) >= 2

        assert wait_until(settled, timeout=60), pipeline.logs()
        time.sleep(1)
        effects = observe(db, pipeline.sink)
        listener_alive = pipeline.listener.running

    assert listener_alive, "bad input must not stop the listener"
    assert effects.welcome == good.expected_welcome_recipients() + Counter({regex_user["email"]: 1})
    letters = {(d["task"], d["reason"]): d for d in effects.dead_letters}
    # The user without an email: no welcome email, a permanent failure naming the cause.
    no_email_letter = letters[("tasks.send_welcome_email", "permanent")]
    assert no_email_letter["payload"]["documentKey"]["_id"] == no_email["_id"]
    assert "email" in no_email_letter["error"]
    # The order pointing at a missing user.
    orphan_letter = letters[("tasks.send_shipping_notification", "permanent")]
    assert orphan_letter["payload"]["documentKey"]["_id"] == orphan_order["_id"]
    assert "user" in orphan_letter["error"].lower()
    # Every good user got a profile, the user without an email got one too (no email is needed).
    assert set(effects.profiles) == {u["_id"] for u in good.users} | {no_email["_id"], regex_user["_id"]}
    assert len(effects.dead_letters) == 2
