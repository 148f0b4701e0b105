"""The watch loop with a lease (active/standby, step-down) and with lost history (gap records)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from pymongo.errors import OperationFailure

from changeflow.listener.checkpoints import FencedOut
from changeflow.listener.exit_codes import EXIT_HISTORY_LOST, EXIT_OK
from changeflow.listener.lease import Holder, LeaseLost
from tests.unit.test_listener_stream import (
    FakeDatabase,
    FakeGaps,
    Journal,
    make_listener,
    task_ids,
    token,
    user_insert,
)


class FakeLease:
    """Acquire results and renew failures, scripted."""

    def __init__(self, acquire: list[bool], lose_after_renewals: int | None = None) -> None:
        self.acquire = acquire
        self.lose_after = lose_after_renewals
        self.epoch: int | None = None
        self.owner = "me"
        self.holder: Holder | None = Holder("other", 7, None)
        self.poll_seconds = 0.001
        self.renew_seconds = 0.001
        self.renewals = 0
        self.released = False
        self.clock = lambda: datetime(2026, 1, 1, tzinfo=UTC)

    @property
    def held(self) -> bool:
        return self.epoch is not None

    def try_acquire(self) -> bool:
        if self.acquire and self.acquire.pop(0):
            self.epoch = 8
            return True
        return False

    def renew_if_due(self) -> None:
        self.renewals += 1
        if self.lose_after is not None and self.renewals > self.lose_after:
            self.epoch = None
            raise LeaseLost("taken over by other (epoch 9)")

    def forget(self) -> None:
        self.epoch = None

    def release(self) -> None:
        self.released = True
        self.epoch = None


class FencedJournal(Journal):
    def __init__(self, *args: Any, fence_after: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fence_after = fence_after
        self.epochs: list[Any] = []
        self.claims: list[int] = []

    def claim(self, stream: str, epoch: int) -> None:
        self.claims.append(epoch)

    def save(self, stream: str, resume_token: dict[str, str], **fields: Any) -> None:
        if self.fence_after is not None and len(self.checkpoints()) >= self.fence_after:
            raise FencedOut("epoch 9 owns it")
        self.epochs.append(fields.get("epoch"))
        super().save(stream, resume_token, **fields)


def test_standby_until_acquired_then_claims_and_fences_every_save(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    db, journal = FakeDatabase([user_insert(1)]), FencedJournal(saved=token(0))
    lease = FakeLease([False, False, True])
    listener = make_listener(db, journal, lease=lease)
    assert listener.run() == EXIT_OK
    assert caplog.text.count("listener standby: stream test-stream is held by other (epoch 7") == 1  # once
    assert "active for stream test-stream (epoch 8" in caplog.text
    assert journal.claims == [8] and journal.epochs == [8]
    assert journal.published() == task_ids(user_insert(1))
    assert lease.released


def test_lease_lost_stops_publishing_and_goes_back_to_standby(caplog: pytest.LogCaptureFixture) -> None:
    # Renewals: 1 at the loop's start, 2 after the first batch is read, 3 before publishing it (lost).
    db, journal = FakeDatabase([user_insert(1), user_insert(2)]), FencedJournal(saved=token(0))
    lease = FakeLease([True, False], lose_after_renewals=2)
    listener = make_listener(db, journal, lease=lease)
    db.scripts.append([])  # a second stream, never opened: it stays standby until stopped
    original = lease.try_acquire

    def acquire() -> bool:
        if not lease.acquire:
            listener.stop()
        return original()

    lease.try_acquire = acquire  # type: ignore[method-assign]
    assert listener.run() == EXIT_OK
    assert journal.published() == []  # nothing published without a confirmed lease
    assert "lease lost on stream test-stream" in caplog.text
    assert any(r.levelno == logging.ERROR and "going back to standby" in r.message for r in caplog.records)
    assert not listener.ready.is_set()


def test_fenced_checkpoint_goes_back_to_standby(caplog: pytest.LogCaptureFixture) -> None:
    db, journal = FakeDatabase([user_insert(1)]), FencedJournal(saved=token(0), fence_after=0)
    lease = FakeLease([True, False])
    listener = make_listener(db, journal, lease=lease)
    original = lease.try_acquire

    def acquire() -> bool:
        if len(lease.acquire) == 1:  # the second attempt, after stepping down
            listener.stop()
        return original()

    lease.try_acquire = acquire  # type: ignore[method-assign]
    assert listener.run() == EXIT_OK
    assert "fenced out on stream test-stream" in caplog.text
    assert journal.published() == task_ids(user_insert(1))  # published, but the checkpoint was refused
    assert journal.checkpoints() == []


def test_history_lost_fail_records_the_gap_and_exits_3(caplog: pytest.LogCaptureFixture) -> None:
    lost = OperationFailure("resume point no longer in the oplog", code=286)
    db, journal, gaps = FakeDatabase(lost), Journal(saved=token(5)), FakeGaps()
    assert make_listener(db, journal, gaps=gaps).run() == EXIT_HISTORY_LOST
    assert gaps.records == [("test-stream", token(5), None, "unknown")]
    assert "Gap gap-1 recorded" in caplog.text
    assert journal.entries == []


def test_history_lost_resume_now_records_the_gap_and_starts_now(caplog: pytest.LogCaptureFixture) -> None:
    lost = OperationFailure("resume point no longer in the oplog", code=286)
    db, journal, gaps = (
        FakeDatabase(lost, [user_insert(9)], initial_token=token(8)),
        Journal(saved=token(5)),
        FakeGaps(),
    )
    assert make_listener(db, journal, gaps=gaps, on_history_lost="resume-now").run() == EXIT_OK
    assert [o["start_after"] for o in db.opened] == [token(5), None]
    assert gaps.resumed_at == [("gap-1", token(8))]
    assert journal.entries == [
        ("checkpoint", token(8)),  # the new start, saved at once
        ("publish", task_ids(user_insert(9))),
        ("checkpoint", token(9)),
    ]
    assert any(r.levelno == logging.WARNING and "gap gap-1" in r.message for r in caplog.records)


def test_a_late_insert_after_a_resume_is_noted_in_the_gap_before_the_checkpoint() -> None:
    lost = OperationFailure("resume point no longer in the oplog", code=286)
    gaps = FakeGaps(since=datetime(2026, 12, 1, tzinfo=UTC), until=datetime(2026, 12, 1, 0, 10, tzinfo=UTC))
    late, live = user_insert(9), user_insert(10)
    late["documentKey"]["_id"] = late["fullDocument"]["_id"] = ObjectId.from_datetime(gaps.until)
    live["documentKey"]["_id"] = live["fullDocument"]["_id"] = ObjectId.from_datetime(
        gaps.until + timedelta(seconds=1)
    )  # created after the window: not noted
    db, journal = FakeDatabase(lost, [late, live], initial_token=token(8)), Journal(saved=token(5))
    gaps.journal = journal
    assert make_listener(db, journal, gaps=gaps, on_history_lost="resume-now").run() == EXIT_OK
    assert journal.entries == [
        ("checkpoint", token(8)),
        ("publish", task_ids(late, live)),
        ("gap-delivered", ("gap-1", [{"coll": "users", "id": late["documentKey"]["_id"]}])),
        ("checkpoint", token(10)),
    ]
