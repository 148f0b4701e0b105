"""The ordering sets and parked messages (changeflow/worker/ordering.py) against a real redis-server."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from changeflow.worker.ordering import Advanced, Gate, Order, OrderBook, parked_key, queue_key
from harness.redis_server import RedisServer

TASK = "tasks.notify"
KEY = 'documentKey={"_id": 1}'


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def book(client: redis.Redis) -> OrderBook:
    return OrderBook(client)


def order(member: str, key: str = KEY) -> Order:
    return Order(key, member)


def test_only_the_lowest_member_of_a_key_runs_the_others_park(book: OrderBook) -> None:
    # Registered out of order (two batches retried, say): the set orders them by member.
    assert book.register([(TASK, order("8202")), (TASK, order("8201")), (TASK, order("8203"))]) == 3
    assert book.members(TASK, KEY) == ["8201", "8202", "8203"]
    assert book.gate(TASK, order("8203"), b"m3") is Gate.PARKED
    assert book.gate(TASK, order("8202"), b"m2") is Gate.PARKED
    assert book.gate(TASK, order("8201"), b"m1") is Gate.HEAD
    assert book.parked(TASK, KEY) == {"8202": b"m2", "8203": b"m3"}


def test_keys_and_tasks_are_independent(book: OrderBook) -> None:
    book.register([(TASK, order("8202")), (TASK, order("8201", "k2")), ("tasks.other", order("8200"))])
    assert book.gate(TASK, order("8202"), b"a") is Gate.HEAD  # 8201 is of another key
    assert book.gate("tasks.other", order("8200"), b"b") is Gate.HEAD
    assert book.gate(TASK, order("8201", "k2"), b"c") is Gate.HEAD


def test_advance_hands_over_to_the_next_member_and_its_parked_message(book: OrderBook) -> None:
    book.register([(TASK, order(m)) for m in ("8201", "8202", "8203")])
    assert book.gate(TASK, order("8202"), b"m2") is Gate.PARKED
    assert book.advance(TASK, order("8201")) == Advanced("8202", b"m2")
    # The parked copy stays until the republished message passes the gate (a crash before the
    # republish loses nothing): then it is dropped.
    assert book.parked(TASK, KEY) == {"8202": b"m2"}
    assert book.gate(TASK, order("8202"), b"m2") is Gate.HEAD
    assert book.parked(TASK, KEY) == {}
    # 8203 has not arrived yet: nothing to republish, it will find itself the head.
    assert book.advance(TASK, order("8202")) == Advanced("8203", None)
    assert book.gate(TASK, order("8203"), b"m3") is Gate.HEAD
    assert book.advance(TASK, order("8203")) == Advanced(None, None)


def test_advance_is_idempotent(book: OrderBook, client: redis.Redis) -> None:
    book.register([(TASK, order(m)) for m in ("8201", "8202")])
    book.gate(TASK, order("8202"), b"m2")
    first = book.advance(TASK, order("8201"))
    # A worker that died before republishing: its redelivery advances again and gets the same answer.
    assert book.advance(TASK, order("8201")) == first == Advanced("8202", b"m2")
    assert book.members(TASK, KEY) == ["8202"]
    book.gate(TASK, order("8202"), b"m2")
    book.advance(TASK, order("8202"))
    book.advance(TASK, order("8202"))
    # An emptied key leaves nothing behind in Redis.
    assert not client.exists(queue_key(TASK, KEY), parked_key(TASK, KEY))


def test_a_member_not_in_the_set_runs(book: OrderBook) -> None:
    # Finished before (a duplicate), or registered in a set Redis lost: the dedup guard decides.
    book.register([(TASK, order("8202"))])
    assert book.gate(TASK, order("8201"), b"old") is Gate.RUN
    assert book.parked(TASK, KEY) == {}


def test_registering_again_is_idempotent(book: OrderBook) -> None:
    book.register([(TASK, order("8201")), (TASK, order("8202"))])
    book.register([(TASK, order("8201")), (TASK, order("8202"))])  # a listener replay
    assert book.members(TASK, KEY) == ["8201", "8202"]


def test_pending_lists_the_members_after_one(book: OrderBook) -> None:
    book.register([(TASK, order(f"82{n:02d}")) for n in range(1, 8)])
    assert book.pending(TASK, order("8203"), limit=2) == (["8204", "8205"], 4)
    assert book.pending(TASK, order("8207")) == ([], 0)


def test_park_and_advance_race_never_strands_a_message(redis_server: RedisServer) -> None:
    """A task parking while the head finishes: whichever script runs first, it runs exactly once.

    Many rounds of two threads, each with its own connection: one parks member 2 behind member 1,
    the other advances member 1. Afterwards either the gate let 2 run (advance came first) or the
    advance returned 2's parked message (the park came first); never neither, never both.
    """
    clients = [redis.Redis.from_url(redis_server.url) for _ in range(2)]
    parker, advancer = (OrderBook(c) for c in clients)
    outcomes = {"ran_at_gate": 0, "handed_over": 0}
    try:
        for round_ in range(300):
            key = f"race{round_}"
            parker.register([(TASK, order("8201", key)), (TASK, order("8202", key))])
            start = threading.Barrier(2)
            got: dict[str, object] = {}

            def park(key: str = key, got: dict[str, object] = got, start: threading.Barrier = start) -> None:
                start.wait()
                got["gate"] = parker.gate(TASK, order("8202", key), b"m2")

            def advance(
                key: str = key, got: dict[str, object] = got, start: threading.Barrier = start
            ) -> None:
                start.wait()
                got["advanced"] = advancer.advance(TASK, order("8201", key))

            threads = [threading.Thread(target=park), threading.Thread(target=advance)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            gate, advanced = got["gate"], got["advanced"]
            assert isinstance(advanced, Advanced) and advanced.head == "8202"
            if gate is Gate.HEAD:
                assert advanced.parked is None  # the advance came first: nothing was parked yet
                outcomes["ran_at_gate"] += 1
            else:
                assert gate is Gate.PARKED and advanced.parked == b"m2"  # handed over to be republished
                outcomes["handed_over"] += 1
        assert sum(outcomes.values()) == 300
    finally:
        for c in clients:
            c.close()


def test_the_message_is_only_made_when_it_must_be_parked(book: OrderBook) -> None:
    made: list[str] = []

    def message(member: str) -> bytes:
        made.append(member)
        return f"m{member}".encode()

    book.register([(TASK, order("8201")), (TASK, order("8202"))])
    assert book.gate(TASK, order("8201"), lambda: message("8201")) is Gate.HEAD
    assert book.gate(TASK, order("8202"), lambda: message("8202")) is Gate.PARKED
    assert made == ["8202"]
    assert book.parked(TASK, KEY) == {"8202": b"m8202"}
    assert OrderBook.of(book.client) is OrderBook.of(book.client)


def test_a_head_run_inline_keeps_its_parked_copy_until_it_advances(book: OrderBook) -> None:
    """A chain runs a parked task with no message of its own: a crash mid-run must find it again."""
    book.register([(TASK, order("8201")), (TASK, order("8202")), (TASK, order("8203"))])
    assert book.gate(TASK, order("8202"), b"m2") is Gate.PARKED
    assert book.gate(TASK, order("8203"), b"m3") is Gate.PARKED
    assert book.advance(TASK, order("8201")) == Advanced("8202", b"m2")
    assert book.gate(TASK, order("8202"), lambda: b"unused", keep_parked=True) is Gate.HEAD
    assert book.parked(TASK, KEY) == {"8202": b"m2", "8203": b"m3"}
    # The worker dies here: 8201's redelivery finds itself done and advances again: 8202 comes back.
    assert book.advance(TASK, order("8201")) == Advanced("8202", b"m2")
    # 8202 ends: its member and its parked copy go together, 8203 is handed over.
    assert book.advance(TASK, order("8202")) == Advanced("8203", b"m3")
    assert book.parked(TASK, KEY) == {"8203": b"m3"}
