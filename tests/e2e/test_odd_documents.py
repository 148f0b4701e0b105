"""Odd documents end to end: real redis-server, MongoDB (test server, or MONGODB_URI), SMTP sink,
`python -m listener` and `celery -A worker worker` processes; writes through plain pymongo.

A document holding a sub-document with exactly the keys `__type__` and `__value__` used to make the
worker fail to decode the task message, log "Can't decode message body" and ack it: no email, no
profile, no dead letter. Every such document must now have all its effects; and a message a worker
cannot decode all the same (one written by an older listener) must end as a dead letter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from bson import Binary, Decimal128, Int64, ObjectId, Timestamp
from bson.code import Code
from bson.dbref import DBRef
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.regex import Regex
from celery import Celery

from changeflow.worker.app import celery_config
from changeflow.worker.keys import dedup_key
from changeflow.worker.settings import Settings
from harness.effects import observe
from harness.pipeline import LocalPipeline, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WELCOME = "tasks.send_welcome_email"


def deep(levels: int) -> Any:
    value: Any = {"__type__": "int64", "__value__": 1}
    for level in range(levels):
        value = {"__value__": [value], "__type__": "x"} if level % 2 else {"d": value}
    return value


# The documents and their kin: dicts shaped like kombu's type envelope (with an unknown
# marker, a valid one, nested in each other, changeflow's own marker), the BSON types that used to be
# refused, $-prefixed, dotted and empty field names below the top level, deep nesting, a large string.
ODD_FIELDS: list[dict[str, Any]] = [
    {"prefs": {"__type__": "x", "__value__": 1}},
    {"prefs": {"__type__": "datetime", "__value__": "2026-01-02T03:04:05"}},
    {"prefs": {"__value__": 5, "__type__": "int64"}},
    {"prefs": {"__type__": {"__type__": "bytes", "__value__": "a"}, "__value__": {"__type__": 0, "__value__": 0}}},  # noqa: E501
    {"prefs": {"__type__": "changeflow_dict", "__value__": [["__type__", 1], ["__value__", 2]]}},
    {"pattern": Regex("^a", "i"), "hook": Code("function () {}"), "scoped": Code("f(x)", {"x": Int64(1)})},
    {"range": [MinKey(), MaxKey()], "ref": DBRef("orders", ObjectId(), "shop"), "ts": Timestamp(1, 2)},
    {"money": Decimal128("-NaN"), "blob": Binary(b"\x00\xff", 0x80), "uuid": Binary(b"\x01" * 16, 4)},
    {"nested": {"$set": {"a.b": 1, "": [Int64(2**40)], "$x": {"__type__": "x", "__value__": 1}}}},
    {"deep": deep(90)},
    {"bio": "x" * 2_000_000},
]  # fmt: skip


def test_odd_documents_have_every_effect_and_no_dead_letter() -> None:
    users = [
        {"_id": ObjectId(), "email": f"odd{i}@example.test", "name": f"Odd {i}", **fields}
        for i, fields in enumerate(ODD_FIELDS)
    ]
    with LocalPipeline(workers=2) as pipeline:
        assert pipeline.sink is not None
        for user in users:
            pipeline.db.users.insert_one(user)

        def done() -> bool:
            effects = observe(pipeline.db, pipeline.sink)
            return len(effects.welcome) == len(users) and len(effects.profiles) == len(users)

        assert wait_until(done, timeout=120), pipeline.logs()
        time.sleep(1)  # a late dead letter or duplicate would show now
        effects = observe(pipeline.db, pipeline.sink)
        logs = pipeline.logs()

    assert effects.welcome == {user["email"]: 1 for user in users}
    assert effects.profiles == {user["_id"]: 1 for user in users}
    assert effects.dead_letters == []
    assert "decode" not in logs.lower() and "Traceback" not in logs, logs


def publish_raw(broker_url: str, task_name: str, task_id: str, body: str) -> None:
    """A task message with `body` as its JSON text, as an older listener might have written it."""
    app = Celery("changeflow-old-listener", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=broker_url)))
    headers, properties, _, _ = app.amqp.as_task_v2(task_id, task_name, args=[], kwargsrepr="{}")
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange="",
            routing_key=app.conf.task_default_queue,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            **properties,
        )
    app.close()


def test_a_message_the_worker_cannot_decode_is_a_dead_letter_and_replays_with_refresh() -> None:
    user = {"_id": ObjectId(), "email": "undecodable@example.test", "name": "U", "prefs": {"__type__": "x"}}
    event_id = {"_data": "82FEED"}
    task_id = dedup_key(event_id, WELCOME)
    # The payload as kombu's json wrote it before the escaping: the dict reads as an unknown type.
    oid = {"__type__": "bson_objectid", "__value__": str(user["_id"])}
    payload = {
        "_id": event_id,
        "operationType": "insert",
        "ns": {"db": "changeflow", "coll": "users"},
        "documentKey": {"_id": oid},
        "fullDocument": {**user, "_id": oid, "prefs": {"__type__": "x", "__value__": 1}},
    }
    body = json.dumps([[payload], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    pipeline = LocalPipeline(workers=1)
    try:
        pipeline.start(listener=False)  # no listener: the user's insert itself publishes nothing
        assert pipeline.sink is not None and pipeline.redis is not None
        db = pipeline.db
        db.users.insert_one(user)
        publish_raw(pipeline.redis.url, WELCOME, task_id, body)

        def lettered() -> bool:
            return db.changeflow_dead_letters.find_one({"_id": task_id}) is not None

        assert wait_until(lettered, timeout=60), pipeline.logs()
        letter = db.changeflow_dead_letters.find_one({"_id": task_id})
        assert letter is not None
        assert (letter["reason"], letter["task"]) == ("undecodable", WELCOME)
        assert "Unsupported type" in letter["error"]
        # What could be read of it: enough for a replay with --refresh to find the document.
        assert letter["payload"]["documentKey"] == {"_id": user["_id"]}
        assert letter["payload"]["fullDocument"]["prefs"] == {"__type__": "x", "__value__": 1}
        broker = redis.Redis.from_url(pipeline.redis.url)
        # Acked (just after the letter was stored): neither in the queue nor among kombu's unacked
        # messages; it is the letter now.
        assert wait_until(lambda: (broker.llen("celery"), broker.hlen("unacked")) == (0, 0), timeout=30)
        broker.close()
        assert not pipeline.sink.messages

        replay = subprocess.run(
            [
                sys.executable,
                "-m",
                "listener",
                "dead-letters",
                "replay",
                "--reason",
                "undecodable",
                "--refresh",
            ],
            cwd=ROOT,
            env={**os.environ, **pipeline.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr

        def welcomed() -> bool:
            return observe(db, pipeline.sink).welcome == {user["email"]: 1}

        assert wait_until(welcomed, timeout=60), pipeline.logs()
        assert db.changeflow_dead_letters.find_one({"_id": task_id})["replay_count"] == 1
    finally:
        pipeline.stop()
