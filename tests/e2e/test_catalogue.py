"""The seed guide's catalogue end to end: real redis-servers (broker + dedup store, and the
application's cache), MongoDB (test server, or MONGODB_URI), `python -m listener` and two
`celery -A worker worker` processes. Users and orders are inserted, updated, replaced and deleted
with plain pymongo; the test's own change stream says what each event was, to compare with."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from bson import ObjectId, Timestamp

from harness.pipeline import LocalPipeline, wait_until
from harness.redis_server import RedisServer
from tasks.event_store import HISTORY_ORDER

pytestmark = pytest.mark.e2e


def users(n: int) -> list[dict[str, Any]]:
    found = [{"_id": ObjectId(), "email": f"cat{i}@example.test", "name": f"Cat {i}"} for i in range(n)]
    found.append({"_id": ObjectId(), "name": "No Email"})
    return found


def test_event_log_event_store_and_cache_invalidation_each_exactly_once() -> None:
    people = users(5)
    orders = [
        {"_id": ObjectId(), "user_id": people[i]["_id"], "status": "pending", "total": i} for i in range(4)
    ]
    u0, u1, u2, u3 = (p["_id"] for p in people[:4])
    with (
        RedisServer() as cache_server,
        LocalPipeline(workers=2, extra_env={"CACHE_REDIS_URL": cache_server.url}) as pipeline,
    ):
        assert pipeline.listener is not None and pipeline.client is not None
        db = pipeline.db
        cache = redis.Redis.from_url(cache_server.url)
        # What the application cached before the writes.
        stale = [f"{kind}:{uid}" for uid in (u0, u1, u2, u3) for kind in ("user", "user_profile")] + [
            "user_by_email:cat0@example.test",  # u0's old email
            "user_by_email:new0@example.test",  # and its new one (a negative lookup cached earlier)
            "user_by_email:cat1@example.test",  # u1's unchanged email: the cached user is stale
            "user_by_email:cat2@example.test",  # u2 replaced: old email
            "user_by_email:new2@example.test",  # and the replacement's
            "user_by_email:cat3@example.test",  # u3 deleted
        ]
        unrelated = [
            f"user:{people[4]['_id']}",
            "user_by_email:cat4@example.test",
            "session:abc",
            "user:other",
        ]
        cache.mset({key: "cached" for key in stale + unrelated})

        with db.watch(full_document="updateLookup") as observed:  # the test's own view of the changes
            db.users.insert_many([dict(p) for p in people])
            db.orders.insert_many([dict(o) for o in orders])
            db.users.update_one({"_id": u0}, {"$set": {"email": "new0@example.test"}})
            db.users.update_one({"_id": u1}, {"$set": {"name": "Cat One"}})
            db.users.replace_one({"_id": u2}, {"email": "new2@example.test", "name": "Cat Two"})
            db.users.delete_one({"_id": u3})
            db.orders.update_one({"_id": orders[0]["_id"]}, {"$set": {"status": "paid"}})
            db.orders.replace_one({"_id": orders[1]["_id"]}, {"user_id": u0, "status": "void", "total": 0})
            db.orders.delete_one({"_id": orders[2]["_id"]})
            with pipeline.client.start_session() as session, session.start_transaction():
                # One commit, one clusterTime: the event store still reads them in their order.
                db.orders.update_one({"_id": orders[3]["_id"]}, {"$set": {"note": "a"}}, session=session)
                db.orders.update_one({"_id": orders[3]["_id"]}, {"$set": {"note": "b"}}, session=session)
            events = [observed.next() for _ in range(6 + 4 + 4 + 3 + 2)]
        assert {e["ns"]["coll"] for e in events} == {"users", "orders"}

        def done() -> bool:
            return (
                db.event_store.count_documents({}) >= len(events)
                and db.event_log.count_documents({}) >= len(people)
                and cache.exists(*stale) == 0
            )

        assert wait_until(done, timeout=90), pipeline.logs()
        time.sleep(2)  # late duplicates would show up now
        entries = list(db.event_store.find())
        stored = {e["eventId"]: e for e in entries}
        logged = list(db.event_log.find())
        history = list(db.event_store.find({"aggregateId": orders[3]["_id"]}).sort(HISTORY_ORDER))
        remaining = cache.exists(*unrelated)
        cache.close()
        listener_log = pipeline.listener.log_text()
        logs = pipeline.logs()

    # Exactly one event_store entry per change event, as the change stream showed it.
    assert len(entries) == len(stored) == len(events)
    for event in events:
        entry = stored[event["_id"]["_data"]]
        assert entry["_id"] == entry["eventId"]
        assert entry["eventType"] == event["operationType"]
        assert entry["aggregateId"] == event["documentKey"]["_id"]
        assert isinstance(entry["aggregateId"], ObjectId)
        assert isinstance(entry["timestamp"], Timestamp) and entry["timestamp"] == event["clusterTime"]
        if event["operationType"] in ("insert", "replace"):
            assert entry["eventData"] == event["fullDocument"]
        elif event["operationType"] == "update":
            assert entry["eventData"] == event["updateDescription"]
        else:
            assert "eventData" not in entry
    assert [e["eventType"] for e in history] == ["insert", "update", "update"]
    assert [e["eventData"]["updatedFields"] for e in history[1:]] == [{"note": "a"}, {"note": "b"}]
    assert history[1]["timestamp"] == history[2]["timestamp"]  # the transaction's one commit

    # Exactly one event_log entry per user, the user without an email included.
    assert sorted((e["user_id"], e["metadata"]["email"]) for e in logged) == sorted(
        (p["_id"], p.get("email")) for p in people
    )
    assert {e["type"] for e in logged} == {"user_registered"}

    # Every stale key went, the old emails' too; the others stayed.
    assert remaining == len(unrelated)
    assert "pre-images enabled on changeflow.users" in listener_log
    assert "could not be known" not in logs  # every change had its pre-image
    assert "Traceback" not in logs, logs
