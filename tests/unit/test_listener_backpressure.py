"""changeflow.listener.backpressure and the loop's pause: nothing read while the broker's queue is full."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from changeflow.listener.backpressure import FIRST_WAIT, MAX_WAIT, Backpressure, next_wait, resume_below
from changeflow.listener.exit_codes import EXIT_OK
from changeflow.listener.health import HealthFile, check
from tests.unit.test_listener_stream import STREAM, FakeDatabase, Journal, make_listener, token, user_insert
from worker import app as repo_app

ROUTES = repo_app.routes  # this repository's app (tasks/): the card's routes


def test_resume_threshold_is_below_the_bound_and_at_least_one() -> None:
    assert resume_below(100_000) == 90_000
    assert resume_below(20) == 18
    assert resume_below(1) == 1  # a bound of 1: go on once the queue is empty


def test_waits_grow_to_a_cap() -> None:
    waits = [next_wait(None)]
    for _ in range(10):
        waits.append(next_wait(waits[-1]))
    assert waits[0] == FIRST_WAIT and waits[-1] == MAX_WAIT
    assert waits == sorted(waits)


def test_a_bound_needs_a_positive_limit() -> None:
    with pytest.raises(ValueError, match="LISTENER_MAX_QUEUE_LENGTH"):
        Backpressure(lambda: 0, 0)


def test_the_broker_is_asked_only_after_something_was_published() -> None:
    asked: list[int] = []
    lengths = iter([5, 25, 25, 3])

    def length() -> int:
        asked.append(1)
        return next(lengths)

    bound = Backpressure(length, 20)
    assert bound.full() is None and len(asked) == 1  # the first look: room
    assert bound.full() is None and len(asked) == 1  # nothing published since: not asked again
    bound.published(0)
    assert bound.full() is None and len(asked) == 1
    bound.published(10)
    assert bound.full() == 25 and len(asked) == 2
    assert bound.full() == 25 and len(asked) == 3  # still full: asked every time until there is room
    assert bound.full() is None and len(asked) == 4


def test_the_loop_reads_nothing_while_the_queue_is_full_and_goes_on_below_90_percent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(saved=token(0))
    health = HealthFile(tmp_path / "health.json", STREAM)
    states: list[dict[str, object] | None] = []
    # Room, then full after the first batch (30 >= 20), still above the resume mark (18), then below it.
    lengths: Iterator[int] = iter([0, 30, 25, 19, 17, 0])

    def queue_length() -> int:
        value = next(lengths)
        journal.entries.append(("queue", value))
        states.append(json.loads(health.path.read_text()).get("paused") if health.path.exists() else None)
        return value

    db = FakeDatabase([user_insert(1), user_insert(2), None, user_insert(3), user_insert(4)])
    listener = make_listener(db, journal, backpressure=Backpressure(queue_length, 20), health=health)
    db.listener = listener
    caplog.set_level(logging.INFO, logger="changeflow.listener.stream")
    assert listener.run() == EXIT_OK

    kinds = [kind if kind != "queue" else f"queue {value}" for kind, value in journal.entries]
    first_publish = kinds.index("publish")
    assert kinds[: first_publish + 1] == ["queue 0", "publish"]
    # After the first batch: full, and nothing is published (nor read) until the queue is below 18.
    after = [k for k in kinds[first_publish + 1 :] if k != "checkpoint"]
    assert after[:5] == ["queue 30", "queue 25", "queue 19", "queue 17", "publish"]
    assert journal.published() == [
        t for n in (1, 2, 3, 4) for t in _task_ids(n)
    ]  # every event, in order: nothing dropped
    # The health file said so while paused, and no more once the loop went on.
    assert states[2] is not None and states[2]["limit"] == 20 and states[2]["queued"] == 30
    assert json.loads(health.path.read_text())["paused"] is None
    pausing = [r for r in caplog.records if "pausing the change stream" in r.getMessage()]
    resuming = [r for r in caplog.records if "resuming the change stream" in r.getMessage()]
    assert len(pausing) == 1 and len(resuming) == 1
    assert "LISTENER_MAX_QUEUE_LENGTH is 20" in pausing[0].getMessage()


def test_health_reports_a_paused_listener_as_healthy_and_says_why(tmp_path: Path) -> None:
    health = HealthFile(tmp_path / "health.json", STREAM)
    health.heartbeat("active", 1)
    health.paused(150, 100)
    healthy, reason = check(health.path, max_stall=30, ready=True)
    assert healthy, reason
    assert "paused" in reason and "broker queue 150 messages, LISTENER_MAX_QUEUE_LENGTH 100" in reason
    health.resumed()
    healthy, reason = check(health.path, max_stall=30, ready=True)
    assert healthy and "paused" not in reason


def _task_ids(n: int) -> list[str]:
    from changeflow.listener.publish import messages_for

    return [m.task_id for m in messages_for(user_insert(n), ROUTES)]
