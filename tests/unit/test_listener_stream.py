"""The watch loop, driven with scripted fakes: ordering of publish and checkpoint, retries, exits."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest
from pymongo.errors import AutoReconnect, OperationFailure

from changeflow.listener.backoff import Backoff
from changeflow.listener.checkpoints import Checkpoint
from changeflow.listener.exit_codes import EXIT_FATAL, EXIT_HISTORY_LOST, EXIT_OK, EXIT_USAGE
from changeflow.listener.gaps import GapEnd
from changeflow.listener.publish import BrokerUnavailable, Message, Rejected
from changeflow.listener.stream import Listener, is_resumable
from changeflow.worker.settings import Settings
from worker import app as repo_app

ROUTES = repo_app.routes  # this repository's app (tasks/): the card's routes

STREAM = "test-stream"


def token(n: int) -> dict[str, str]:
    return {"_data": f"82{n:08X}"}


def user_insert(n: int) -> dict[str, Any]:
    return {
        "_id": token(n),
        "operationType": "insert",
        "ns": {"db": "app", "coll": "users"},
        "documentKey": {"_id": n},
        "fullDocument": {"_id": n, "email": f"u{n}@example.com"},
    }


def invalidate(n: int) -> dict[str, Any]:
    return {"_id": token(n), "operationType": "invalidate"}


class FakeStream:
    """Plays a script: events, None (an empty getMore) or an exception; then asks the listener to stop.

    ("idle", token) advances the postBatchResumeToken like an empty getMore; ("closed", token) also
    ends the stream, as a getMore that returns cursor id 0 does. A callable is called (to move a fake
    clock) and then acts as an empty getMore.
    """

    def __init__(self, script: Sequence[Any], start: dict[str, str] | None, on_end: Any) -> None:
        self.script = list(script)
        self.resume_token = start
        self.alive = True
        self.on_end = on_end

    def try_next(self) -> dict[str, Any] | None:
        if not self.script:
            self.on_end()
            return None
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, tuple):  # ("idle", token) or ("closed", token)
            self.resume_token = item[1]
            self.alive = item[0] != "closed"
            return None
        if item is None:
            return None
        if callable(item):
            item()
            return None
        self.resume_token = item["_id"]
        if item.get("operationType") == "invalidate":  # a fragment may not carry it
            self.alive = False
        return item

    def __enter__(self) -> FakeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.alive = False


class FakeDatabase:
    """`watch()` returns the next scripted stream (or raises the scripted error) and records its options."""

    name = "app"

    def __init__(self, *scripts: Any, initial_token: dict[str, str] | None = None) -> None:
        self.scripts = list(scripts)
        self.opened: list[dict[str, Any]] = []
        self.initial_token = initial_token or token(0)
        self.listener: Listener | None = None
        self.hello: dict[str, Any] = {"maxWireVersion": 21}  # MongoDB 7.0
        self.version = [7, 0, 0, 0]
        self.commands: list[tuple[str, Any, dict[str, Any]]] = []  # collMod / create, in order
        self.refuse: dict[str, BaseException] = {}  # command name -> what the server answers

    def command(self, name: str, value: Any = None, **options: Any) -> dict[str, Any]:
        if name in ("collMod", "create"):
            self.commands.append((name, value, options))
            refusal = self.refuse.get(name)
            if refusal is not None:
                raise refusal
            return {}
        return self.hello if name == "hello" else {"versionArray": self.version}

    def watch(self, pipeline: list[dict[str, Any]], **options: Any) -> FakeStream:
        self.opened.append({"pipeline": pipeline, **options})
        assert self.listener is not None
        if not self.scripts:
            self.listener.stop()
            return FakeStream([], options["start_after"], lambda: None)
        script = self.scripts.pop(0)
        if isinstance(script, BaseException):
            raise script
        start = options["start_after"] or self.initial_token
        return FakeStream(script, start, self.listener.stop if not self.scripts else lambda: None)


class FakeGaps:
    """The gap store: what was recorded, resumed and noted; the resumed gap has the window given."""

    def __init__(self, since: datetime | None = None, until: datetime | None = None) -> None:
        self.records: list[tuple[Any, ...]] = []
        self.resumed_at: list[Any] = []
        self.since, self.until = since, until
        self.journal: Journal | None = None  # where noted inserts go, in order with the rest

    def record(
        self, stream: str, from_token: Any, from_time: Any, to_time: Any, time_source: str = ""
    ) -> str:
        self.records.append((stream, from_token, from_time, time_source))
        return "gap-1"

    def resumed(self, identifier: str, time: Any, token: Any) -> None:
        self.resumed_at.append((identifier, token))

    def ends(self, stream: str) -> list[GapEnd]:
        assert stream == STREAM
        if not self.resumed_at or self.since is None or self.until is None:
            return []
        return [GapEnd(self.resumed_at[-1][0], self.since, self.until)]

    def delivered(self, identifier: str, inserts: Sequence[Mapping[str, Any]]) -> None:
        assert self.journal is not None, "a note no test expected"
        self.journal.entries.append(("gap-delivered", (identifier, [dict(each) for each in inserts])))


class Journal:
    """One ordered record of what the publisher, dead letters and checkpoints saw."""

    def __init__(self, saved: dict[str, str] | None = None) -> None:
        self.entries: list[tuple[str, Any]] = []
        self.saved = saved
        self.fail_publish = 0
        self.reject: set[str] = set()  # task ids to reject as unserializable

    # Publisher
    def publish(self, messages: Sequence[Message]) -> list[Rejected]:
        if self.fail_publish:
            self.fail_publish -= 1
            self.entries.append(("publish-failed", len(messages)))
            raise BrokerUnavailable("broker down")
        rejected = [Rejected(m, "EncodeError", "tb") for m in messages if m.task_id in self.reject]
        self.entries.append(("publish", [m.task_id for m in messages if m.task_id not in self.reject]))
        return rejected

    # CheckpointStore
    def load(self, stream: str) -> dict[str, str] | None:
        assert stream == STREAM
        return self.saved

    def load_record(self, stream: str) -> Checkpoint | None:
        token = self.load(stream)
        return None if token is None else Checkpoint(token)

    def save(self, stream: str, resume_token: dict[str, str], **_fields: Any) -> None:
        assert stream == STREAM
        self.saved = resume_token
        self.entries.append(("checkpoint", resume_token))

    # dead letters
    def dead_letter(self, rejected: Rejected) -> None:
        self.entries.append(("dead-letter", rejected.message.task_id))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.entries]

    def published(self) -> list[str]:
        return [task_id for kind, ids in self.entries if kind == "publish" for task_id in ids]

    def checkpoints(self) -> list[Any]:
        return [value for kind, value in self.entries if kind == "checkpoint"]


def make_listener(
    db: FakeDatabase, journal: Journal, batch_size: int = 100, checkpoint_interval_ms: int = 0, **kwargs: Any
) -> Listener:
    """A listener on the fakes; it saves the checkpoint after every batch unless told otherwise."""
    settings = Settings(
        listener_stream_name=STREAM,
        listener_batch_size=batch_size,
        listener_max_await_ms=1000,
        listener_checkpoint_interval_ms=checkpoint_interval_ms,
    )
    kwargs.setdefault("backoff", Backoff(base=0.001, cap=0.002))
    kwargs.setdefault("gaps", FakeGaps())
    listener = Listener(
        db,  # type: ignore[arg-type]
        journal,
        journal,  # type: ignore[arg-type]
        ROUTES,
        settings=settings,
        dead_letter=journal.dead_letter,
        **kwargs,
    )
    db.listener = listener
    return listener


def task_ids(*events: dict[str, Any]) -> list[str]:
    from changeflow.listener.publish import messages_for

    return [m.task_id for e in events for m in messages_for(e, ROUTES)]


def test_first_start_saves_now_then_publishes_before_each_checkpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    events = [user_insert(1), user_insert(2)]
    db, journal = FakeDatabase([*events, None]), Journal()
    assert make_listener(db, journal).run() == EXIT_OK

    assert "no checkpoint for stream test-stream: starting now" in caplog.text
    assert "listener ready" in caplog.text
    assert db.opened[0]["start_after"] is None
    assert db.opened[0]["full_document"] == "updateLookup"
    assert db.opened[0]["pipeline"][0]["$match"]["$or"]
    assert journal.entries == [
        ("checkpoint", token(0)),  # "now" made durable before the first event
        ("publish", task_ids(*events)),
        ("checkpoint", token(2)),
    ]


def test_resumes_after_the_saved_checkpoint(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    db, journal = FakeDatabase([user_insert(8)]), Journal(saved=token(7))
    make_listener(db, journal).run()
    assert f"resuming stream test-stream after checkpoint {token(7)['_data']}" in caplog.text
    assert db.opened[0]["start_after"] == token(7)
    assert journal.entries == [("publish", task_ids(user_insert(8))), ("checkpoint", token(8))]


def test_batches_are_cut_at_batch_size() -> None:
    events = [user_insert(n) for n in range(1, 6)]
    db, journal = FakeDatabase(events, initial_token=token(0)), Journal(saved=token(0))
    make_listener(db, journal, batch_size=2).run()
    assert journal.kinds() == ["publish", "checkpoint"] * 3
    assert journal.checkpoints() == [token(2), token(4), token(5)]
    assert journal.published() == task_ids(*events)


def test_broker_outage_keeps_the_batch_and_holds_the_checkpoint() -> None:
    events = [user_insert(1), user_insert(2)]
    db, journal = FakeDatabase(events, [user_insert(3)]), Journal(saved=token(0))
    journal.fail_publish = 3
    assert make_listener(db, journal).run() == EXIT_OK
    assert journal.kinds() == [
        "publish-failed",
        "publish-failed",
        "publish-failed",
        "publish",
        "checkpoint",
        "publish",
        "checkpoint",
    ]
    assert journal.published() == task_ids(*events, user_insert(3))
    # The stream reopens after the batch it holds, not after the checkpoint: nothing read twice.
    assert db.opened[1]["start_after"] == token(2)


def test_stop_during_a_broker_outage_leaves_the_checkpoint_behind(caplog: pytest.LogCaptureFixture) -> None:
    db, journal = FakeDatabase([user_insert(1)]), Journal(saved=token(0))
    journal.fail_publish = 10**6
    # The script's end asks the listener to stop while its batch cannot be published.
    assert make_listener(db, journal, backoff=Backoff(base=60, cap=60)).run() == EXIT_OK
    assert journal.checkpoints() == []
    assert "not delivered" in caplog.text


def test_unpublishable_messages_are_dead_lettered_before_the_checkpoint() -> None:
    good, bad = user_insert(1), user_insert(2)
    db, journal = FakeDatabase([good, bad]), Journal(saved=token(0))
    journal.reject = set(task_ids(bad))
    listener = make_listener(db, journal)
    assert listener.run() == EXIT_OK
    assert journal.entries == [
        ("publish", task_ids(good)),
        *[("dead-letter", task_id) for task_id in task_ids(bad)],
        ("checkpoint", token(2)),
    ]
    per_event = len(task_ids(good))  # the tasks a users insert triggers in this repository's app
    assert (listener.stats.events, listener.stats.tasks, listener.stats.dead_letters) == (
        2,
        per_event,
        per_event,
    )


def test_history_lost_exits_with_its_own_code(caplog: pytest.LogCaptureFixture) -> None:
    lost = OperationFailure("resume point no longer in the oplog", code=286)
    db, journal = FakeDatabase(lost), Journal(saved=token(5))
    assert make_listener(db, journal).run() == EXIT_HISTORY_LOST
    assert journal.entries == []
    assert "history lost" in caplog.text
    assert any(r.levelno == logging.ERROR for r in caplog.records)


def test_non_resumable_error_exits_fatal() -> None:
    not_a_replica_set = OperationFailure("$changeStream is only supported on replica sets", code=40573)
    db, journal = FakeDatabase([user_insert(1), not_a_replica_set]), Journal(saved=token(0))
    assert make_listener(db, journal).run() == EXIT_FATAL
    # A batch cut short by an error is not published: it is read again after the checkpoint.
    assert journal.entries == []


@pytest.mark.parametrize(
    "denied",
    [
        OperationFailure("Authentication failed.", code=18),  # wrong user/password/authSource
        OperationFailure("not authorized on app to execute command", code=13),  # missing role
    ],
)
def test_refused_credentials_exit_with_the_usage_code_at_once(
    denied: OperationFailure, caplog: pytest.LogCaptureFixture
) -> None:
    # Also where every other MongoDB error is retried: opening the stream.
    db, journal = FakeDatabase(denied, denied, denied), Journal(saved=token(0))
    listener = make_listener(db, journal)
    listener.settings = dataclasses.replace(
        listener.settings, mongodb_uri="mongodb://app:hunter2@db1,db2/?replicaSet=rs0"
    )
    started = time.monotonic()
    assert listener.run() == EXIT_USAGE
    assert time.monotonic() - started < 5  # no backoff round
    line = next(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "MONGODB_URI (mongodb://app:****@db1,db2/?replicaSet=rs0)" in line
    assert f"code {denied.code}" in line and "hunter2" not in caplog.text
    assert journal.entries == []


IMAGES = {"changeStreamPreAndPostImages": {"enabled": True}}


def test_pre_images_are_enabled_once_and_asked_of_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    db = FakeDatabase([user_insert(1), AutoReconnect("connection reset")], [user_insert(2)])
    journal = Journal(saved=token(0))
    assert make_listener(db, journal).run() == EXIT_OK
    # tasks.invalidate_user_cache asks for the pre-images of users: collMod once, before the stream.
    assert db.commands == [("collMod", "users", IMAGES)]
    assert [o.get("full_document_before_change") for o in db.opened] == ["whenAvailable"] * len(db.opened)
    lines = [r.getMessage() for r in caplog.records if "pre-images enabled" in r.getMessage()]
    assert lines == [
        "change stream pre-images enabled on app.users (collMod changeStreamPreAndPostImages), "
        "for tasks.invalidate_user_cache"
    ]


def test_without_a_route_asking_for_them_there_is_no_collmod_and_no_option() -> None:
    from tests.card import card_routes

    db, journal = FakeDatabase([user_insert(1)]), Journal(saved=token(0))
    listener = make_listener(db, journal)
    listener.routes = card_routes()
    listener.pre_image_collections = {}
    listener._pre_images_enabled = True
    assert listener.run() == EXIT_OK
    assert db.commands == []
    assert all("full_document_before_change" not in o for o in db.opened)


def test_a_collection_that_does_not_exist_yet_is_created_with_pre_images() -> None:
    db, journal = FakeDatabase([user_insert(1)]), Journal(saved=token(0))
    db.refuse["collMod"] = OperationFailure("ns does not exist: app.users", code=26)
    assert make_listener(db, journal).run() == EXIT_OK
    assert db.commands == [("collMod", "users", IMAGES), ("create", "users", IMAGES)]


@pytest.mark.parametrize(
    "refusal",
    [
        OperationFailure("not authorized on app to execute command { collMod: ... }", code=13),
        OperationFailure("BSON field 'changeStreamPreAndPostImages' is an unknown field.", code=40415),
    ],
)
def test_a_refused_collmod_stops_the_listener_naming_what_failed(
    refusal: OperationFailure, caplog: pytest.LogCaptureFixture
) -> None:
    db, journal = FakeDatabase([user_insert(1)]), Journal(saved=token(0))
    db.refuse["collMod"] = refusal
    started = time.monotonic()
    assert make_listener(db, journal).run() == EXIT_USAGE
    assert time.monotonic() - started < 5  # no backoff round: retrying cannot help
    line = next(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "refused to enable change stream pre-images on app.users" in line
    assert "collMod users changeStreamPreAndPostImages" in line and "tasks.invalidate_user_cache" in line
    assert f"code {refusal.code}" in line and "exiting with code 2" in line
    assert db.opened == [] and journal.entries == []


def test_a_network_error_on_collmod_is_retried() -> None:
    db, journal = FakeDatabase([user_insert(1)]), Journal(saved=token(0))
    db.refuse["collMod"] = AutoReconnect("connection reset")
    listener = make_listener(db, journal)
    original = db.command

    def heal(name: str, value: Any = None, **options: Any) -> dict[str, Any]:
        try:
            return original(name, value, **options)
        finally:
            db.refuse.clear()  # the second attempt goes through

    db.command = heal  # type: ignore[method-assign]
    assert listener.run() == EXIT_OK
    assert [c[0] for c in db.commands] == ["collMod", "collMod"]
    assert journal.published() == task_ids(user_insert(1))


def test_resumable_errors_reopen_from_the_last_position() -> None:
    stepped_down = OperationFailure("primary stepped down", code=189)
    db = FakeDatabase(
        [user_insert(1), user_insert(2), None, user_insert(3), AutoReconnect("connection reset")],
        stepped_down,  # the reopen itself fails once
        [user_insert(3), user_insert(4)],  # the server replays what came after the position
    )
    journal = Journal(saved=token(0))
    assert make_listener(db, journal).run() == EXIT_OK
    # Reopened after the last delivered batch; event 3, read but not published, is read again.
    assert [o["start_after"] for o in db.opened] == [token(0), token(2), token(2)]
    assert journal.published() == task_ids(*(user_insert(n) for n in range(1, 5)))
    assert journal.checkpoints() == [token(2), token(4)]


def test_invalidate_reopens_after_the_invalidation(caplog: pytest.LogCaptureFixture) -> None:
    db = FakeDatabase([user_insert(1), invalidate(2)], [("idle", token(3)), user_insert(4)])
    journal = Journal(saved=token(0))
    assert make_listener(db, journal).run() == EXIT_OK
    assert "invalidated" in caplog.text
    assert db.opened[1]["start_after"] == token(2)
    assert journal.published() == task_ids(user_insert(1), user_insert(4))
    assert journal.checkpoints() == [token(2), token(4)]


def test_stream_closed_without_an_event_is_reopened(caplog: pytest.LogCaptureFixture) -> None:
    # The routes' $match filters the invalidate event out: the stream just ends, its last token
    # being the invalidate's.
    db = FakeDatabase([user_insert(1), ("closed", token(2))], [user_insert(3)])
    journal = Journal(saved=token(0))
    assert make_listener(db, journal).run() == EXIT_OK
    assert "invalidated" in caplog.text
    assert db.opened[1]["start_after"] == token(2)
    assert journal.published() == task_ids(user_insert(1), user_insert(3))


def test_idle_stream_saves_its_advancing_token_at_most_every_interval() -> None:
    idle = [("idle", token(n)) for n in range(1, 6)]
    db, journal = FakeDatabase(idle), Journal(saved=token(0))
    make_listener(db, journal, idle_checkpoint_seconds=3600).run()
    assert journal.checkpoints() == [token(5)]  # only the final one, on stop

    db, journal = FakeDatabase(idle), Journal(saved=token(0))
    make_listener(db, journal, idle_checkpoint_seconds=0).run()
    assert journal.checkpoints() == [token(n) for n in range(1, 6)]


def test_while_events_flow_the_checkpoint_moves_at_most_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("changeflow.listener.stream.time", SimpleNamespace(monotonic=lambda: clock[0]))

    def wait(seconds: float) -> Callable[[], None]:
        return lambda: clock.__setitem__(0, clock[0] + seconds)

    events = [user_insert(n) for n in range(1, 5)]
    script = [events[0], events[1], wait(0.5), events[2], wait(0.6), events[3]]
    db, journal = FakeDatabase(script), Journal(saved=token(0))
    assert make_listener(db, journal, batch_size=1, checkpoint_interval_ms=1000).run() == EXIT_OK
    assert journal.entries == [
        ("publish", task_ids(events[0])),
        ("publish", task_ids(events[1])),  # 0 s since the loaded checkpoint: not due
        ("publish", task_ids(events[2])),  # 0.5 s: not due
        ("checkpoint", token(3)),  # the next turn, 1.1 s: due, the delivered position is saved
        ("publish", task_ids(events[3])),
        ("checkpoint", token(4)),  # on stop, whatever the interval
    ]


def test_stop_finishes_the_batch_in_flight() -> None:
    events = [user_insert(n) for n in range(1, 4)]
    db, journal = FakeDatabase(events), Journal(saved=token(0))
    listener = make_listener(db, journal)
    original = db.watch

    def watch_and_stop(pipeline: list[dict[str, Any]], **options: Any) -> FakeStream:
        stream = original(pipeline, **options)
        next_event = stream.try_next

        def stop_after_first() -> dict[str, Any] | None:
            event = next_event()
            listener.stop()  # as a SIGTERM would, in the middle of collecting
            return event

        stream.try_next = stop_after_first  # type: ignore[method-assign]
        return stream

    db.watch = watch_and_stop  # type: ignore[method-assign]
    assert listener.run() == EXIT_OK
    assert journal.entries == [("publish", task_ids(events[0])), ("checkpoint", token(1))]


@pytest.mark.parametrize(
    ("error", "resumable"),
    [
        (AutoReconnect("reset"), True),
        (OperationFailure("cursor gone", code=43), True),
        (OperationFailure("x", code=2, details={"errorLabels": ["ResumableChangeStreamError"]}), True),
        (OperationFailure("history lost", code=286), False),
        (
            OperationFailure("fatal", code=280, details={"errorLabels": ["NonResumableChangeStreamError"]}),
            False,
        ),
        (OperationFailure("unauthorized", code=13), False),
    ],
)
def test_is_resumable(error: Exception, resumable: bool) -> None:
    assert is_resumable(error) is resumable  # type: ignore[arg-type]


def test_mongodb_unreachable_at_start_is_retried() -> None:
    db, journal = FakeDatabase([user_insert(1)]), Journal(saved=token(0))
    failures = [AutoReconnect("no primary"), AutoReconnect("no primary")]
    original = journal.load

    def load(stream: str) -> dict[str, str] | None:
        if failures:
            raise failures.pop()
        return original(stream)

    journal.load = load  # type: ignore[method-assign]
    assert make_listener(db, journal).run() == EXIT_OK
    assert db.opened[0]["start_after"] == token(0)
    assert journal.entries == [("publish", task_ids(user_insert(1))), ("checkpoint", token(1))]


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="LISTENER_BATCH_SIZE"):
        make_listener(FakeDatabase(), Journal(), batch_size=0)
