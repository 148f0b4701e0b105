"""The dedup store: which task keys are done, and who is running one right now (Redis).

- `changeflow:done:<key>` exists once the task's effect completed (value: the outcome, "ok" or
  "skipped"); it expires after DEDUP_TTL_SECONDS, longer than any redelivery or replay window.
- `changeflow:lease:<key>` exists while one delivery runs the task (value: that delivery's owner
  token). Taken with SET NX PX, its TTL is the hard time limit plus a margin: a killed worker's lease
  simply expires, so it never wedges the key. Released only by its owner (compare-and-delete), so a
  delivery whose lease already expired cannot free a lease someone else holds now.
"""

from __future__ import annotations

import enum
import os
import threading

import redis
from redis.commands.core import Script
from redis.exceptions import ConnectionError, NoScriptError, TimeoutError

from changeflow.worker.settings import Settings, get_settings

PREFIX = "changeflow:"
# Extra lease time over the hard time limit: the guard's own Redis/MongoDB calls around the body.
LEASE_MARGIN_SECONDS = 30

# Look and take in one step (0: done, 1: lease taken, 2: another delivery holds it). Atomic, so no
# delivery can finish between the look and the take.
_CLAIM = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
if redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
-- Our own lease: this claim was sent again after its reply was lost (a timeout, a reconnect).
if redis.call('get', KEYS[2]) == ARGV[1] then return 1 end
return 2
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Mark done and release the lease in one step, so no instant exists with neither of them.
_MARK_DONE = """
redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
if redis.call('get', KEYS[2]) == ARGV[1] then redis.call('del', KEYS[2]) end
return 1
"""


class Claim(enum.Enum):
    """What `DedupStore.claim` found."""

    DONE = 0  # the key's effect completed already
    ACQUIRED = 1  # the lease is ours: run the effect
    BUSY = 2  # another delivery holds the lease


class DedupStore:
    """Done records and leases for task keys. Pass any redis client (tests use a private server)."""

    def __init__(self, client: redis.Redis, *, done_ttl_seconds: int, lease_ttl_seconds: int) -> None:
        self.client = client
        self.done_ttl_seconds = done_ttl_seconds
        self.lease_ttl_ms = lease_ttl_seconds * 1000
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._mark_done = client.register_script(_MARK_DONE)

    @classmethod
    def from_settings(cls, settings: Settings) -> DedupStore:
        return cls(
            settings.redis_target("redis_url").client(socket_timeout=10, socket_connect_timeout=5),
            done_ttl_seconds=settings.dedup_ttl_seconds,
            lease_ttl_seconds=settings.task_time_limit + LEASE_MARGIN_SECONDS,
        )

    @staticmethod
    def done_key(key: str) -> str:
        return f"{PREFIX}done:{key}"

    @staticmethod
    def lease_key(key: str) -> str:
        return f"{PREFIX}lease:{key}"

    def is_done(self, key: str) -> bool:
        return bool(self.client.exists(self.done_key(key)))

    def outcome(self, key: str) -> str | None:
        """How the key was completed ("ok", "skipped"), or None when it is not done."""
        value = self.client.get(self.done_key(key))
        return value.decode() if isinstance(value, bytes) else value

    def claim(self, key: str, owner: str) -> Claim:
        """Unless the key is done, take its lease for `owner` (SET NX PX); one atomic round trip."""
        found = self._script(
            self._claim, [self.done_key(key), self.lease_key(key)], [owner, self.lease_ttl_ms]
        )
        return Claim(int(found))

    def lease_owner(self, key: str) -> str | None:
        value = self.client.get(self.lease_key(key))
        return value.decode() if isinstance(value, bytes) else value

    def lease_ttl(self, key: str) -> float | None:
        """Seconds left on the key's lease, or None when nobody holds it."""
        ms = int(self.client.pttl(self.lease_key(key)))
        return ms / 1000 if ms >= 0 else None

    def release_lease(self, key: str, owner: str) -> bool:
        """Drop the lease if `owner` still holds it; True when it did."""
        return bool(self._script(self._release, [self.lease_key(key)], [owner]))

    def mark_done(self, key: str, owner: str, outcome: str = "ok") -> None:
        """Record the key as done (for DEDUP_TTL_SECONDS) and release `owner`'s lease."""
        self._script(
            self._mark_done,
            [self.done_key(key), self.lease_key(key)],
            [owner, outcome, self.done_ttl_seconds],
        )

    def _script(self, script: Script, keys: list[str], args: list[object]) -> object:
        """One EVALSHA straight on a pooled connection: the guard's per-task round trips, without
        redis-py's per-command wrapper (retry policy, observability hooks, response callbacks).

        A connection error or timeout (redis-py has dropped the connection then), or a server that lost
        the script (a restart, SCRIPT FLUSH), goes through redis-py's full path instead: its retries,
        and loading the script. Every script here may run twice with the same arguments (idempotent).
        The connection goes back to the pool after each call: a gevent pool runs each task in a new
        greenlet, so a connection kept per thread (greenlet) would never be returned.
        """
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_command("EVALSHA", script.sha, len(keys), *keys, *args))
            return conn.read_response()
        except (ConnectionError, TimeoutError, NoScriptError):
            pass
        finally:
            pool.release(conn)
        return script(keys=keys, args=args)


_store: DedupStore | None = None
_store_pid = 0
_lock = threading.Lock()


def get_dedup_store() -> DedupStore:
    """The process's dedup store, created on first use (and again in a forked child)."""
    global _store, _store_pid
    with _lock:
        if _store is None or _store_pid != os.getpid():
            _store, _store_pid = DedupStore.from_settings(get_settings()), os.getpid()
        return _store


def reset_dedup_store() -> None:
    """Forget the store, so the next use connects with the current settings (tests, after fork)."""
    global _store
    with _lock:
        if _store is not None and _store_pid == os.getpid():
            _store.client.close()
        _store = None
