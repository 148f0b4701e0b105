"""All of changeflow's configuration: environment variables with defaults for local use.

One typed, frozen object read once per process. The listener, the worker and the tasks all take
their configuration from here, so a variable means the same thing everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache

from worker.redis_conn import RedisTarget, RedisUrlError, parse_redis_url


class SettingsError(ValueError):
    """A configuration variable has a value changeflow cannot use."""


@dataclass(frozen=True)
class Settings:
    # MongoDB: the database whose collections are watched, and where changeflow keeps its own state
    # (profiles, analytics, checkpoints, dead letters).
    mongodb_uri: str = "mongodb://localhost:27017/?replicaSet=rs0"
    mongodb_db: str = "changeflow"
    # Redis: the Celery broker, and the dedup store (defaults to the broker's server).
    celery_broker_url: str = "redis://localhost:6379/0"
    redis_url: str = ""
    # Redis Sentinel: the master's name, required when a URL above is sentinel://host:port;... (the
    # URL forms, TLS parameters included, are in worker/redis_conn.py).
    redis_sentinel_master: str = ""
    # Outgoing mail.
    smtp_host: str = "localhost"
    smtp_port: int = 1025
    mail_from: str = "changeflow <no-reply@changeflow.local>"
    # Worker behaviour.
    task_soft_time_limit: int = 30
    task_time_limit: int = 60
    task_max_retries: int = 8
    retry_backoff_max: int = 300
    # Must exceed the longest task (time limit plus all its retry waits are separate messages, so
    # the time limit is what counts); otherwise Redis redelivers tasks that are still running.
    broker_visibility_timeout: int = 3600
    dedup_ttl_seconds: int = 7 * 24 * 3600
    # A worker sends its buffered task events (what Flower shows) at most this often, in one message
    # (0: on the event loop's next turn, Celery's own behaviour). worker/consumer.py.
    worker_event_flush_ms: int = 20
    # Listener behaviour.
    listener_batch_size: int = 500
    listener_max_await_ms: int = 500
    listener_stream_name: str = "changeflow"
    # While events flow, save the checkpoint at most this often (0: after every batch). Every batch is
    # in the broker before its position may be saved; a restart re-reads at most this much (same task
    # ids: the dedup guard drops the copies), for one MongoDB write per interval instead of per batch.
    listener_checkpoint_interval_ms: int = 1000
    # How task messages reach Redis: "pipelined" (a batch per round trip, listener/pipelined.py) or
    # "celery" (app.send_task per message). Workers see the same messages either way.
    listener_publisher: str = "pipelined"
    # What to do when the checkpoint is no longer in the oplog: "fail" (record the gap, exit 3) or
    # "resume-now" (record the gap, start from now, keep running). docs/listener.md, "History lost".
    listener_on_history_lost: str = "fail"
    # Failover: one active listener per stream holds a lease in `changeflow_leases`; a standby takes
    # over once it expired. The TTL must be longer than the renew interval.
    listener_lease_ttl_seconds: int = 6
    listener_lease_renew_seconds: int = 2
    # Health: the heartbeat file the loop writes ("" = /tmp/changeflow-listener-<stream>.json) and
    # how long without a heartbeat `python -m listener health` accepts.
    listener_health_file: str = ""
    listener_max_stall_seconds: int = 30

    def __post_init__(self) -> None:
        if not self.redis_url:
            object.__setattr__(self, "redis_url", self.celery_broker_url)
        if self.task_soft_time_limit >= self.task_time_limit:
            raise SettingsError("TASK_SOFT_TIME_LIMIT must be smaller than TASK_TIME_LIMIT")
        if self.broker_visibility_timeout <= self.task_time_limit:
            raise SettingsError("BROKER_VISIBILITY_TIMEOUT must be longer than TASK_TIME_LIMIT")
        if self.listener_on_history_lost not in ("fail", "resume-now"):
            raise SettingsError(
                f"LISTENER_ON_HISTORY_LOST must be fail or resume-now, got {self.listener_on_history_lost!r}"
            )
        if self.listener_publisher not in ("pipelined", "celery"):
            raise SettingsError(
                f"LISTENER_PUBLISHER must be pipelined or celery, got {self.listener_publisher!r}"
            )
        if not 1 <= self.listener_lease_renew_seconds < self.listener_lease_ttl_seconds:
            raise SettingsError(
                "LISTENER_LEASE_RENEW_SECONDS must be at least 1 and smaller than LISTENER_LEASE_TTL_SECONDS"
            )
        if self.listener_max_stall_seconds < 1:
            raise SettingsError("LISTENER_MAX_STALL_SECONDS must be at least 1")
        for name in ("mongodb_uri", "mongodb_db", "celery_broker_url", "smtp_host", "mail_from"):
            if not getattr(self, name):
                raise SettingsError(f"{name.upper()} must not be empty")
        targets = [self.redis_target("celery_broker_url"), self.redis_target("redis_url")]
        if self.redis_sentinel_master and not any(target.sentinel for target in targets):
            raise SettingsError(
                "REDIS_SENTINEL_MASTER is set, but neither CELERY_BROKER_URL nor REDIS_URL is sentinel://"
            )

    def redis_target(self, name: str = "celery_broker_url") -> RedisTarget:
        """The Redis that CELERY_BROKER_URL or REDIS_URL (`name`) points at, TLS and Sentinel included."""
        try:
            return parse_redis_url(
                getattr(self, name), master_name=self.redis_sentinel_master, setting=name.upper()
            )
        except RedisUrlError as exc:
            raise SettingsError(str(exc)) from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every field from the upper-case environment variable of the same name."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = env.get(field.name.upper())
            if raw is None or raw == "":
                continue
            if field.type == "int":
                try:
                    values[field.name] = int(raw)
                except ValueError:
                    raise SettingsError(f"{field.name.upper()} must be an integer, got {raw!r}") from None
                if values[field.name] < 0:  # type: ignore[operator]
                    raise SettingsError(f"{field.name.upper()} must not be negative, got {raw!r}")
            else:
                values[field.name] = raw
        return cls(**values)  # type: ignore[arg-type]


@cache
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()
