"""The dedup store against a real (private) redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from changeflow.worker.dedup import Claim, DedupStore
from harness.redis_server import RedisServer


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def store(client: redis.Redis) -> DedupStore:
    return DedupStore(client, done_ttl_seconds=100, lease_ttl_seconds=60)


def test_a_key_is_done_only_after_mark_done(store: DedupStore, client: redis.Redis) -> None:
    assert not store.is_done("k")
    assert store.claim("k", "a") is Claim.ACQUIRED
    assert not store.is_done("k")  # running is not done
    store.mark_done("k", "a")
    assert store.is_done("k")
    assert store.outcome("k") == "ok"
    assert store.lease_owner("k") is None  # done releases the lease in the same step
    assert 95 <= client.ttl("changeflow:done:k") <= 100


def test_lease_is_exclusive_and_expires(store: DedupStore, client: redis.Redis) -> None:
    assert store.claim("k", "a") is Claim.ACQUIRED
    assert store.claim("k", "b") is Claim.BUSY
    assert store.lease_owner("k") == "a"
    ttl = store.lease_ttl("k")
    assert ttl is not None and 59 < ttl <= 60
    client.pexpire("changeflow:lease:k", 50)  # as if the holder died long ago
    time.sleep(0.1)
    assert store.lease_ttl("k") is None
    assert store.claim("k", "b") is Claim.ACQUIRED


def test_claim_looks_and_takes_in_one_step(store: DedupStore) -> None:
    assert store.claim("k", "a") is Claim.ACQUIRED
    assert store.lease_owner("k") == "a"
    ttl = store.lease_ttl("k")
    assert ttl is not None and 59 < ttl <= 60
    assert store.claim("k", "b") is Claim.BUSY  # another delivery runs it
    assert store.lease_owner("k") == "a"
    store.mark_done("k", "a")
    assert store.claim("k", "c") is Claim.DONE  # done: nobody takes a lease any more
    assert store.lease_owner("k") is None


def test_only_the_owner_releases_a_lease(store: DedupStore) -> None:
    assert store.claim("k", "a") is Claim.ACQUIRED
    assert not store.release_lease("k", "b")
    assert store.lease_owner("k") == "a"
    assert store.release_lease("k", "a")
    assert store.lease_owner("k") is None


def test_mark_done_by_a_stale_owner_keeps_the_current_lease(store: DedupStore) -> None:
    assert store.claim("k", "current") is Claim.ACQUIRED
    store.mark_done("k", "stale", "skipped")
    assert store.outcome("k") == "skipped"
    assert store.lease_owner("k") == "current"


def test_keys_are_prefixed(store: DedupStore, client: redis.Redis) -> None:
    assert store.claim("k1", "a") is Claim.ACQUIRED
    store.mark_done("k2", "a")
    assert sorted(client.keys("*")) == [b"changeflow:done:k2", b"changeflow:lease:k1"]


def test_a_claim_sent_again_by_its_owner_finds_its_lease(store: DedupStore) -> None:
    # A claim whose reply was lost (a timeout) is sent again: it must not find its own lease busy.
    assert store.claim("k", "a") is Claim.ACQUIRED
    assert store.claim("k", "a") is Claim.ACQUIRED
    assert store.claim("k", "b") is Claim.BUSY
    assert store.lease_owner("k") == "a"


def test_scripts_survive_a_script_flush_and_a_dropped_connection(
    store: DedupStore, client: redis.Redis
) -> None:
    assert store.claim("k1", "a") is Claim.ACQUIRED
    client.script_flush()  # as after a Redis restart: the server no longer knows the scripts
    store.mark_done("k1", "a")
    assert store.outcome("k1") == "ok"
    # The server closes every other client's connection (as a restart or a proxy would).
    own = client.client_id()
    for info in client.client_list():
        if int(info["id"]) != own:
            client.client_kill_filter(_id=int(info["id"]))
    assert store.claim("k2", "a") is Claim.ACQUIRED
    assert store.release_lease("k2", "a")
    assert store.claim("k1", "b") is Claim.DONE
