from __future__ import annotations

import random
import uuid

import pytest

from changeflow.worker.keys import CHANGEFLOW_NAMESPACE, dedup_key

TOKEN = {"_data": "8263F0A1B2000000012B022C0100296E5A1004"}


def test_key_is_uuid5_of_task_name_and_token_data() -> None:
    expected = str(uuid.uuid5(CHANGEFLOW_NAMESPACE, "tasks.create_profile\n" + TOKEN["_data"]))
    assert dedup_key(TOKEN, "tasks.create_profile") == expected
    assert uuid.UUID(expected).version == 5


def test_namespace_never_changes() -> None:
    # Changing it would re-run every event still within a redelivery or replay window.
    assert str(CHANGEFLOW_NAMESPACE) == "e91306e0-cb63-5d4e-9e08-d9bc87584537"
    assert dedup_key(TOKEN, "tasks.create_profile") == str(
        uuid.uuid5(
            uuid.UUID("e91306e0-cb63-5d4e-9e08-d9bc87584537"), "tasks.create_profile\n" + TOKEN["_data"]
        )
    )


def test_same_event_same_task_same_key_and_stable() -> None:
    assert dedup_key(dict(TOKEN), "tasks.x") == dedup_key(dict(TOKEN), "tasks.x")


def test_tasks_and_events_get_distinct_keys() -> None:
    other = {"_data": TOKEN["_data"][:-1] + "5"}
    keys = {
        dedup_key(TOKEN, "tasks.send_welcome_email"),
        dedup_key(TOKEN, "tasks.create_profile"),
        dedup_key(other, "tasks.send_welcome_email"),
    }
    assert len(keys) == 3


def test_extra_token_fields_are_ignored() -> None:
    assert dedup_key({**TOKEN, "_typeBits": b"\x01"}, "tasks.x") == dedup_key(TOKEN, "tasks.x")


@pytest.mark.parametrize("token", [{}, {"_data": 5}, {"_data": ""}, {"data": "x"}, "8263F0", None])
def test_malformed_token_raises_value_error(token: object) -> None:
    with pytest.raises(ValueError, match="malformed resume token"):
        dedup_key(token, "tasks.x")  # type: ignore[arg-type]


def test_key_equals_uuid5_for_many_inputs() -> None:
    # dedup_key computes uuid5 itself (sha1, version and variant bits, formatting): it must be
    # uuid.uuid5 exactly, for every variant digit, non-ASCII names and data of any length.
    rnd = random.Random(20260101)
    alphabet = "0123456789ABCDEFabcdef._-\n é☃\U0001f600"
    for _ in range(5000):
        task_name = "tasks." + "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
        data = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 120)))
        expected = str(uuid.uuid5(CHANGEFLOW_NAMESPACE, task_name + "\n" + data))
        assert dedup_key({"_data": data}, task_name) == expected
