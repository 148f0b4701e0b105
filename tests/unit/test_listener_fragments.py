"""Change events over 16 MB: merging $changeStreamSplitLargeEvent fragments, and the watch loop with them."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymongo.errors import AutoReconnect

from changeflow.listener.exit_codes import EXIT_OK
from changeflow.listener.fragments import (
    SPLIT_STAGE,
    FragmentError,
    Reassembler,
    merge_fragments,
    splits_large_events,
)
from tests.unit.test_listener_stream import FakeDatabase, Journal, make_listener, task_ids, token, user_insert


def fragment_token(n: int, fragment: int) -> dict[str, str]:
    return {"_data": f"82{n:08X}{fragment:02X}"}


def split_user_insert(n: int, parts: int = 2) -> list[dict[str, Any]]:
    """user_insert(n) as `parts` fragments: the small fields first, fullDocument in the last one."""
    event = user_insert(n)
    fields = [k for k in event if k not in ("_id", "fullDocument")]
    groups = [fields[i :: parts - 1] for i in range(parts - 1)] + [["fullDocument"]]
    return [
        {
            "_id": fragment_token(n, i),
            "splitEvent": {"fragment": i + 1, "of": parts},
            **{k: event[k] for k in group},
        }
        for i, group in enumerate(groups)
    ]


def whole(fragments: list[dict[str, Any]]) -> dict[str, Any]:
    return merge_fragments(fragments)


# -- merge_fragments ------------------------------------------------------------------------------


def test_merge_gives_the_event_back_with_the_first_fragment_token() -> None:
    first, second = split_user_insert(2)
    merged = merge_fragments([first, second])
    assert merged["_id"] == fragment_token(2, 0)
    assert "splitEvent" not in merged
    assert {k: v for k, v in merged.items() if k != "_id"} == {
        k: v for k, v in user_insert(2).items() if k != "_id"
    }


@given(
    st.dictionaries(
        st.text(min_size=1).filter(lambda k: k not in ("_id", "splitEvent")),
        st.integers() | st.text() | st.none(),
        min_size=1,
        max_size=12,
    ),
    st.data(),
)
def test_any_split_into_consecutive_fields_merges_back(fields: dict[str, Any], data: st.DataObject) -> None:
    names = list(fields)
    cuts = sorted(
        data.draw(st.sets(st.integers(1, len(names) - 1), max_size=len(names) - 1)) if len(names) > 1 else []
    )
    bounds = [0, *cuts, len(names)]
    groups = [names[a:b] for a, b in itertools.pairwise(bounds)]
    fragments = [
        {
            "_id": {"_data": f"T{i}"},
            "splitEvent": {"fragment": i + 1, "of": len(groups)},
            **{k: fields[k] for k in g},
        }
        for i, g in enumerate(groups)
    ]
    assert merge_fragments(fragments) == {"_id": {"_data": "T0"}, **fields}


@pytest.mark.parametrize(
    ("numbers", "message"),
    [
        ([(1, 3), (2, 3)], "fragment"),  # the last one missing
        ([(1, 2), (1, 2)], "fragment 2 of 2 expected"),  # repeated
        ([(2, 2), (1, 2)], "fragment 1 of 2 expected"),  # out of order
        ([(1, 2), (2, 3)], "fragment 2 of 2 expected"),  # of changes
    ],
)
def test_merge_refuses_fragments_that_are_not_1_to_of(numbers: list[tuple[int, int]], message: str) -> None:
    fragments = [
        {"_id": {"_data": f"T{i}"}, "splitEvent": {"fragment": f, "of": o}, f"x{i}": i}
        for i, (f, o) in enumerate(numbers)
    ]
    with pytest.raises(FragmentError, match=message):
        merge_fragments(fragments)


def test_merge_refuses_a_field_in_two_fragments_and_malformed_split_events() -> None:
    first, second = split_user_insert(2)
    with pytest.raises(FragmentError, match="two fragments"):
        merge_fragments([first, {**second, "operationType": "insert"}])
    with pytest.raises(FragmentError, match="malformed"):
        merge_fragments([{**first, "splitEvent": {"fragment": "1", "of": 2}}, second])
    with pytest.raises(FragmentError, match="no fragments"):
        merge_fragments([])


# -- Reassembler ----------------------------------------------------------------------------------


def test_reassembler_passes_whole_events_and_holds_fragments_until_the_last() -> None:
    parts = split_user_insert(2, parts=3)
    reassembler = Reassembler()
    assert reassembler.feed(user_insert(1), token(0)) == user_insert(1)
    assert reassembler.position(token(1)) == token(1)
    assert reassembler.feed(parts[0], token(1)) is None
    assert reassembler.feed(parts[1], parts[0]["_id"]) is None
    # While incomplete, the position stays before the first fragment, whatever the stream says.
    assert reassembler.pending and reassembler.position(parts[1]["_id"]) == token(1)
    assert reassembler.feed(parts[2], parts[1]["_id"]) == merge_fragments(parts)
    assert not reassembler.pending and reassembler.position(parts[2]["_id"]) == parts[2]["_id"]


def test_reassembler_refuses_interleaved_or_missing_fragments_and_forgets_on_reset() -> None:
    first, second = split_user_insert(2)
    reassembler = Reassembler()
    with pytest.raises(FragmentError, match="does not follow"):
        reassembler.feed(second, token(1))  # the first fragment was never seen
    reassembler.feed(first, token(1))
    with pytest.raises(FragmentError, match="arrived after fragment 1 of 2"):
        reassembler.feed(user_insert(3), first["_id"])
    with pytest.raises(FragmentError, match="new split event"):
        reassembler.feed(first, first["_id"])
    reassembler.reset()
    assert not reassembler.pending
    assert reassembler.feed(first, token(1)) is None  # after a reopen, the fragments come again


@pytest.mark.parametrize(
    ("wire", "version", "expected"),
    [
        (21, None, True),  # 7.0
        (25, None, True),  # 8.0
        (17, [6, 0, 9, 0], True),
        (17, [6, 0, 8, 0], False),
        (17, None, None),  # 6.0: buildInfo must tell
        (20, None, False),  # 6.3
        (13, None, False),  # 5.0
    ],
)
def test_which_servers_split_large_events(
    wire: int, version: list[int] | None, expected: bool | None
) -> None:
    assert splits_large_events({"maxWireVersion": wire}, version) is expected


# -- the watch loop -------------------------------------------------------------------------------


def test_the_split_stage_is_last_when_the_server_has_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    db, journal = FakeDatabase([user_insert(1)]), Journal(saved=token(0))
    make_listener(db, journal).run()
    pipeline = db.opened[0]["pipeline"]
    assert len(pipeline) == 2 and "$match" in pipeline[0] and pipeline[-1] == SPLIT_STAGE

    db, journal = FakeDatabase([user_insert(1)]), Journal(saved=token(0))
    db.hello, db.version = {"maxWireVersion": 17}, [6, 0, 12, 0]
    make_listener(db, journal).run()
    assert db.opened[0]["pipeline"][-1] == SPLIT_STAGE


def test_an_older_server_gets_no_split_stage_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    db, journal = FakeDatabase([user_insert(1)]), Journal(saved=token(0))
    db.hello = {"maxWireVersion": 13}  # MongoDB 5.0
    assert make_listener(db, journal).run() == EXIT_OK
    assert [list(stage) for stage in db.opened[0]["pipeline"]] == [["$match"]]
    assert "no $changeStreamSplitLargeEvent" in caplog.text and "BSONObjectTooLarge" in caplog.text
    assert journal.published() == task_ids(user_insert(1))


def test_a_split_event_straddling_batches_is_published_whole_and_the_checkpoint_waits() -> None:
    first, second = split_user_insert(2)
    # None: an empty getMore ends the first batch after the first fragment.
    db, journal = FakeDatabase([user_insert(1), first, None, second, user_insert(3)]), Journal(saved=token(0))
    assert make_listener(db, journal).run() == EXIT_OK
    merged = whole([first, second])
    assert journal.entries == [
        ("publish", task_ids(user_insert(1))),
        ("checkpoint", token(1)),  # not the first fragment's token: the event is not published yet
        ("publish", task_ids(merged, user_insert(3))),
        ("checkpoint", token(3)),
    ]
    # One message per task, carrying the whole event; its task ids come from the first fragment's token.
    assert task_ids(merged) == task_ids({**user_insert(2), "_id": first["_id"]})


def test_a_stream_error_inside_a_split_event_rereads_it_from_its_first_fragment() -> None:
    first, second = split_user_insert(2)
    db = FakeDatabase(
        [user_insert(1), first, None, AutoReconnect("connection reset")],
        [first, second],  # the server sends the whole event again after the position
    )
    journal = Journal(saved=token(0))
    assert make_listener(db, journal).run() == EXIT_OK
    assert [o["start_after"] for o in db.opened] == [token(0), token(1)]
    assert journal.published() == task_ids(user_insert(1), whole([first, second]))
    assert journal.checkpoints() == [token(1), second["_id"]]


def test_the_last_fragment_is_the_position_after_a_split_event() -> None:
    first, second = split_user_insert(2)
    db = FakeDatabase([first, second, None, AutoReconnect("reset")], [user_insert(3)])
    journal = Journal(saved=token(0))
    assert make_listener(db, journal).run() == EXIT_OK
    assert db.opened[1]["start_after"] == second["_id"]
    assert journal.published() == task_ids(whole([first, second]), user_insert(3))


def test_a_broken_fragment_sequence_is_read_again_not_published(caplog: pytest.LogCaptureFixture) -> None:
    first, second = split_user_insert(2)
    # A fragment 2 without its fragment 1; then the server sends everything after the position again.
    db = FakeDatabase([user_insert(1), second], [user_insert(1), first, second])
    journal = Journal(saved=token(0))
    assert make_listener(db, journal).run() == EXIT_OK
    assert "broken split event" in caplog.text
    assert [o["start_after"] for o in db.opened] == [token(0), token(0)]
    # The batch cut short by the error is read again; nothing half an event was ever published.
    assert journal.published() == task_ids(user_insert(1), whole([first, second]))
