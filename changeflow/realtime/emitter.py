"""The tasks' side: Socket.IO emits published on Redis for the gateways (python-socketio's write-only
RedisManager), one manager per process and Redis target.

python-socketio's manager logs and drops an emit Redis refused; here a refused publish raises, so the
dedup guard retries the task (a transient Redis error) instead of marking it done. The connection
comes from changeflow's Redis URL reading (TLS parameters, Sentinel) for REALTIME_REDIS_URL.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import socketio

from changeflow.worker.redis_conn import RedisTarget
from changeflow.worker.settings import Settings, mask_url

log = logging.getLogger(__name__)


class Emitter(socketio.RedisManager):  # type: ignore[misc]
    """A write-only socketio.RedisManager whose publish raises what Redis raised."""

    def __init__(self, target: RedisTarget, url: str, channel: str) -> None:
        # The URL is only shown (masked); the connection is made from `target`.
        super().__init__(url=mask_url(url), channel=channel, write_only=True, logger=log)
        self._target = target

    def _redis_connect(self) -> None:
        self.redis = self._target.client(socket_timeout=10, socket_connect_timeout=10)
        self.connected = True

    def _publish(self, data: Any) -> None:
        if not self.connected:
            self._redis_connect()
        try:
            # How many gateways were subscribed (RedisManager.emit drops the value; send() reads it).
            self.last_receivers = int(self.redis.publish(self.channel, self.json.dumps(data)))
        except Exception:
            self.connected = False  # the next attempt reconnects
            raise

    def _handle_emit(self, message: Any) -> None:
        pass  # write-only: no clients of its own to deliver to

    def send(self, event: str, data: Any, rooms: Sequence[str]) -> int:
        """Emit `event` with `data` to every client in `rooms`: one publish, whatever their number.

        Returns how many gateways received it (0: none runs, and no client can be connected).
        """
        if not rooms:
            return 0
        self.last_receivers = 0
        self.emit(event, data, to=list(rooms), namespace="/")
        return self.last_receivers


_emitters: dict[tuple[int, str, str], Emitter] = {}
_lock = threading.Lock()


def get_emitter(settings: Settings) -> Emitter:
    """This process's emitter for REALTIME_REDIS_URL and REALTIME_CHANNEL (a fork makes its own)."""
    key = (os.getpid(), settings.realtime_redis_url, settings.realtime_channel)
    with _lock:
        emitter = _emitters.get(key)
        if emitter is None:
            target = settings.redis_target("realtime_redis_url")
            emitter = Emitter(target, settings.realtime_redis_url, settings.realtime_channel)
            _emitters[key] = emitter
        return emitter
