"""The fault suite's evidence for a broker loss: messages Redis accepted, read back from its AOF."""

from __future__ import annotations

import base64
import json

import redis
from bson import ObjectId

from harness.redis_server import RedisServer
from tests.faults.scenarios import accepted_messages


def test_accepted_messages_reads_every_lpushed_message_from_the_aof() -> None:
    user_id = ObjectId()
    envelopes = [
        {"body": _b64(f'[["user {user_id}"], {{}}, {{}}]'),
         "headers": {"task": "tasks.send_welcome_email", "id": "id-1"}},
        {"body": _b64("[[], {}, {}]"), "headers": {"task": "tasks.create_profile", "id": "id-2"}},
    ]  # fmt: skip
    with RedisServer(appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        client.set("unrelated", "x")
        client.lpush("celery", *(json.dumps(e) for e in envelopes))
        client.brpop(["celery"])  # popped: still accepted once, as the AOF says
        messages = accepted_messages(server.dir)
        client.close()

    assert [(name, task_id) for name, task_id, _ in messages] == [
        ("tasks.send_welcome_email", "id-1"),
        ("tasks.create_profile", "id-2"),
    ]
    assert str(user_id) in messages[0][2]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
