"""The stream's state for the console's first page, from the same sources as `changeflow health`/`gaps`.

Each part is read on its own: MongoDB or the broker being away shows as that part's error, the rest
of the page still renders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from changeflow.listener import health
from changeflow.listener.checkpoints import CheckpointStore
from changeflow.listener.dead_letters import COLLECTION as DEAD_LETTERS
from changeflow.listener.gaps import GapStore
from changeflow.listener.lease import COLLECTION as LEASES
from changeflow.listener.metrics import oldest_oplog_time, seconds_between

if TYPE_CHECKING:
    from celery import Celery
    from pymongo.database import Database

    from changeflow.worker.settings import Settings


@dataclass
class StreamStatus:
    stream: str
    now: datetime
    health_file: str
    health_visible: bool = False  # the listener's heartbeat file is on this machine
    healthy: bool = False
    health: str = ""
    role: str | None = None
    paused: dict[str, Any] | None = None
    lease: dict[str, Any] | None = None  # owner, epoch, expires_at, active
    checkpoint: dict[str, Any] | None = None  # position_time, updated_at, epoch, ages
    gaps: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: int | None = None
    queue_length: int | None = None
    queue_limit: int = 0
    oplog_headroom: str | None = None  # how far the checkpoint is from falling off the oplog
    errors: dict[str, str] = field(default_factory=dict)  # part -> why it could not be read

    @property
    def headroom(self) -> int | None:
        """Messages the broker queue can take before the listener pauses (None: unknown or unbounded)."""
        if self.queue_length is None or not self.queue_limit:
            return None
        return max(0, self.queue_limit - self.queue_length)


def age_seconds(then: datetime | None, now: datetime) -> float | None:
    if then is None:
        return None
    aware = then if then.tzinfo else then.replace(tzinfo=UTC)
    return max(0.0, (now - aware).total_seconds())


def age_text(seconds: float | None) -> str:
    """`4.2s`, `3m 05s`, `2h 07m`, `3d 4h`: how long ago, for a person."""
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def headroom_text(position: datetime | None, oldest: datetime | None) -> str | None:
    """The checkpoint's time minus the oldest oplog entry's, for a person (as the metric
    changeflow_listener_oplog_headroom_seconds); None when either is unknown."""
    if position is None or oldest is None:
        return None
    aware = position if position.tzinfo else position.replace(tzinfo=UTC)
    seconds = seconds_between(aware, oldest)
    if seconds < 0:
        return "none: the checkpoint is older than the oldest oplog entry (history lost)"
    return age_text(seconds)


def health_path(settings: Settings) -> Path:
    return Path(settings.listener_health_file or health.default_path(settings.listener_stream_name))


def read_status(
    settings: Settings, db: Database, app: Celery | None, now: datetime | None = None
) -> StreamStatus:
    now = now or datetime.now(UTC)
    stream = settings.listener_stream_name
    path = health_path(settings)
    status = StreamStatus(
        stream=stream, now=now, health_file=str(path), queue_limit=settings.listener_max_queue_length
    )
    # The heartbeat file is local to the listener's machine: meaningful when the console runs there.
    status.health_visible = path.exists()
    status.healthy, status.health = health.check(path, settings.listener_max_stall_seconds)
    try:
        state = json.loads(path.read_text())
        status.role = state.get("role")
        status.paused = state.get("paused") if isinstance(state.get("paused"), dict) else None
    except (OSError, ValueError):
        pass
    try:
        _read_mongodb(status, db, now)
    except Exception as exc:  # pymongo's errors, any of them: the page says so
        status.errors["mongodb"] = f"MongoDB unavailable: {type(exc).__name__}: {str(exc)[:200]}"
    if status.checkpoint is not None:
        try:  # reading local.oplog.rs needs its own right: its refusal is this part's error only
            oldest = oldest_oplog_time(db.client)
            status.oplog_headroom = headroom_text(status.checkpoint["position_time"], oldest)
        except Exception as exc:
            status.errors["oplog"] = f"oplog window unavailable: {type(exc).__name__}: {str(exc)[:200]}"
    if app is not None:
        from changeflow.listener.backpressure import BrokerQueueLength

        queue_length = BrokerQueueLength(app)
        try:
            status.queue_length = queue_length()
        except Exception as exc:
            status.errors["broker"] = str(exc)[:200]
        finally:
            queue_length.close()
    return status


def _read_mongodb(status: StreamStatus, db: Database, now: datetime) -> None:
    lease = db[LEASES].find_one({"_id": status.stream})
    if lease is not None:
        expires = lease.get("expires_at")
        expires = (
            expires.replace(tzinfo=UTC) if isinstance(expires, datetime) and not expires.tzinfo else expires
        )
        status.lease = {
            "owner": lease.get("owner"),
            "epoch": lease.get("epoch"),
            "expires_at": expires,
            "active": isinstance(expires, datetime) and expires > now,
            "renewed_ago": age_text(age_seconds(lease.get("renewed_at"), now)),
        }
    record = CheckpointStore(db).load_record(status.stream)
    if record is not None:
        status.checkpoint = {
            "has_token": record.token is not None,
            "position_time": record.position_time,
            "position_age": age_text(age_seconds(record.position_time, now)),
            "updated_at": record.updated_at,
            "updated_age": age_text(age_seconds(record.updated_at, now)),
            "epoch": record.epoch,
        }
    status.gaps = GapStore(db).list(include_resolved=False)
    status.dead_letters = db[DEAD_LETTERS].count_documents({})
