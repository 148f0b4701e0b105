"""All of changeflow's configuration: environment variables with defaults for local use.

One typed, frozen object read once per process. The listener, the worker and the tasks all take
their configuration from here, so a variable means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from email.utils import parseaddr
from functools import cache
from urllib.parse import unquote

import redis.connection
from pymongo import uri_parser
from pymongo.errors import PyMongoError

from changeflow.worker.redis_conn import RedisTarget, RedisUrlError, parse_redis_url


class SettingsError(ValueError):
    """A configuration variable has a value changeflow cannot use."""


# URL schemes each consumer of a URL accepts: the Celery broker goes through kombu's Redis transport
# (changeflow/worker/broker.py), the dedup store through redis-py (which also takes unix sockets).
BROKER_SCHEMES = ("redis", "rediss", "sentinel")
REDIS_SCHEMES = ("redis", "rediss", "unix", "sentinel")
MONGODB_SCHEMES = ("mongodb", "mongodb+srv")
# The variables holding URLs that may carry a password: what scrub() hides in any text.
URL_VARIABLES = (
    "MONGODB_URI",
    "CELERY_BROKER_URL",
    "REDIS_URL",
    "REALTIME_REDIS_URL",
    "CACHE_REDIS_URL",
)
# Variables that are secrets as a whole: scrub() hides their values too.
SECRET_VARIABLES = ("REALTIME_SECRET", "CONSOLE_PASSWORD")
# The shortest REALTIME_SECRET the gateway accepts (what secrets.token_urlsafe(32) gives is longer).
MIN_REALTIME_SECRET_LENGTH = 32
# Below this a getMore on an idle stream returns at once and the listener spins on the CPU.
MIN_MAX_AWAIT_MS = 10
MASK = "****"
_SECRET_PARAMETER = re.compile(r"([?&][^=&#]*(?:password|secret|token)[^=&#]*=)([^&#]*)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """`url` with its password (and any password/secret/token query parameter) replaced by ****.

    For every URL that is logged or put in an error message: redis://:****@host:6379/0,
    mongodb://user:****@a,b/?replicaSet=rs0. The user name stays, to say which account is meant.
    kombu's lists of URLs (`sentinel://:pw@a:26379;sentinel://:pw@b:26379`) are masked one by one.
    """
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _SECRET_PARAMETER.sub(lambda m: m.group(1) + MASK, url)
    authority_end = len(rest)
    for stop in "?#":
        if stop in rest:
            authority_end = min(authority_end, rest.index(stop))
    head, tail = rest[:authority_end], rest[authority_end:]
    if "@" in head:  # the last @ ends the user info: a password with an unescaped @ stays hidden
        userinfo, _, hosts = head.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        head = f"{user}:{MASK}@{hosts}" if colon else f"{userinfo}@{hosts}"
    return f"{scheme}://{head}{_SECRET_PARAMETER.sub(lambda m: m.group(1) + MASK, tail)}"


def url_secrets(url: str) -> list[str]:
    """The passwords in `url` as written and percent-decoded (what a library may echo back)."""
    if ";" in url:
        return sorted({s for part in url.split(";") for s in url_secrets(part)}, key=len, reverse=True)
    found = []
    _, sep, rest = url.partition("://")
    head = re.split(r"[?#]", rest, maxsplit=1)[0] if sep else ""
    if "@" in head:
        _, colon, password = head.rpartition("@")[0].partition(":")
        if colon and password:
            found.append(password)
    found.extend(m.group(2) for m in _SECRET_PARAMETER.finditer(url) if m.group(2))
    return sorted({*found, *(unquote(s) for s in found)} - {""}, key=len, reverse=True)


def scrub(text: str, urls: list[str] | None = None) -> str:
    """`text` with the passwords of `urls` (default: the URL variables of the environment) masked."""
    if urls is None:
        urls = [os.environ.get(name, "") for name in URL_VARIABLES]
    for url in urls:
        if url:
            text = text.replace(url, mask_url(url))
        for secret in url_secrets(url):
            text = text.replace(secret, MASK)
    for name in SECRET_VARIABLES:
        value = os.environ.get(name, "")
        if value:
            text = text.replace(value, MASK)
    return text


@dataclass(frozen=True)
class Settings:
    # MongoDB: the database whose collections are watched, and where changeflow keeps its own state
    # (profiles, analytics, checkpoints, dead letters).
    mongodb_uri: str = "mongodb://localhost:27017/?replicaSet=rs0"
    mongodb_db: str = "changeflow"
    # Redis: the Celery broker, and the dedup store (defaults to the broker's server).
    celery_broker_url: str = "redis://localhost:6379/0"
    redis_url: str = ""
    # The application's cache, whose user keys tasks.invalidate_user_cache deletes (defaults to REDIS_URL).
    cache_redis_url: str = ""
    # Redis Sentinel: the master's name, required when a URL above is sentinel://host:port;... (the
    # URL forms, TLS parameters included, are in changeflow/worker/redis_conn.py).
    redis_sentinel_master: str = ""
    # Outgoing mail.
    smtp_host: str = "localhost"
    smtp_port: int = 1025
    mail_from: str = "changeflow <no-reply@changeflow.local>"
    # Worker behaviour.
    task_soft_time_limit: int = 30
    task_time_limit: int = 60
    # A transient error is retried (backoff capped at RETRY_BACKOFF_MAX) until this long after the
    # task's first attempt, then dead-lettered "retries_exhausted": an outage of SMTP, MongoDB or
    # Redis shorter than this loses nothing. TASK_MAX_RETRIES, when set, is an extra cap on the count.
    task_retry_for_seconds: int = 3600
    task_max_retries: int | None = None
    retry_backoff_max: int = 300
    # Must exceed the longest task (time limit plus all its retry waits are separate messages, so
    # the time limit is what counts); otherwise Redis redelivers tasks that are still running.
    broker_visibility_timeout: int = 3600
    dedup_ttl_seconds: int = 7 * 24 * 3600
    # Per-key ordering: a task whose end hands its key over to a parked task runs that one in the same
    # process (and the next, ...) instead of publishing it again, at most this many per chain and while
    # less than this many seconds (capped at half TASK_SOFT_TIME_LIMIT) passed since it started; the
    # rest is published as before. 0 tasks: always publish. docs/ordering.md, "Chains".
    ordered_chain_max_tasks: int = 16
    ordered_chain_max_seconds: int = 5
    # A worker sends its buffered task events (what Flower shows) at most this often, in one message
    # (0: on the event loop's next turn, Celery's own behaviour). changeflow/worker/consumer.py.
    worker_event_flush_ms: int = 20
    # Listener behaviour.
    listener_batch_size: int = 500
    listener_max_await_ms: int = 500
    listener_stream_name: str = "changeflow"
    # While events flow, save the checkpoint at most this often (0: after every batch). Every batch is
    # in the broker before its position may be saved; a restart re-reads at most this much (same task
    # ids: the dedup guard drops the copies), for one MongoDB write per interval instead of per batch.
    listener_checkpoint_interval_ms: int = 1000
    # How task messages reach Redis: "pipelined" (a batch per round trip, changeflow/listener/pipelined.py) or
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
    # Backpressure: while the broker's task queue holds at least this many messages, the listener
    # stops reading the change stream (the checkpoint waits) and goes on once the queue is below 90 %
    # of it; nothing is dropped (0: no bound). changeflow/listener/backpressure.py.
    listener_max_queue_length: int = 100_000
    # Real-time notifications (changeflow/realtime/): tasks publish Socket.IO emits on this Redis's
    # pub/sub channel (default: REDIS_URL's server), and every gateway subscribed to it delivers them.
    realtime_redis_url: str = ""
    realtime_channel: str = "changeflow-realtime"
    # The gateway's address (port 0: any free port, the ready line says which).
    realtime_host: str = "127.0.0.1"
    realtime_port: int = 8000
    # Signs client tokens; required by the gateway (and `changeflow realtime token`), nobody else.
    realtime_secret: str = dataclasses.field(default="", repr=False)
    realtime_token_ttl: int = 3600
    # 1: the gateway's page offers a demo sign-in that hands out a token for any user id. Never in
    # production: anyone reaching the gateway could read anyone's notifications.
    realtime_demo: int = 0
    # A post's followers are read in _id-ordered pages of this many (one emit per page).
    realtime_follower_batch_size: int = 500
    # The operator console (`changeflow console`, changeflow/console/): HTTP basic auth with these; it
    # refuses to start without a password unless bound to 127.0.0.1. FLOWER_URL: a link on its pages.
    console_user: str = "admin"
    console_password: str = dataclasses.field(default="", repr=False)
    console_host: str = "127.0.0.1"
    console_port: int = 8100
    flower_url: str = ""
    # Prometheus /metrics (changeflow/listener/metrics.py, changeflow/worker/metrics.py): served by the
    # listener and by each worker's main process on these ports when set (unset: no server).
    listener_metrics_port: int | None = None
    worker_metrics_port: int | None = None
    # The address those servers bind (compose: 0.0.0.0, so the Prometheus container reaches them).
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.redis_url:
            object.__setattr__(self, "redis_url", self.celery_broker_url)
        if not self.realtime_redis_url:
            object.__setattr__(self, "realtime_redis_url", self.redis_url)
        if not self.cache_redis_url:
            object.__setattr__(self, "cache_redis_url", self.redis_url)
        for problem in settings_problems(self):
            raise SettingsError(problem)

    def retry_span_seconds(self) -> int:
        """The longest a task's retries can go on after its first attempt: retries are scheduled for
        TASK_RETRY_FOR_SECONDS, the last waits at most RETRY_BACKOFF_MAX and runs at most TASK_TIME_LIMIT.
        With TASK_MAX_RETRIES set, no longer than that many waits and runs."""
        span = self.task_retry_for_seconds + self.retry_backoff_max + self.task_time_limit
        if self.task_max_retries is not None:
            span = min(span, self.task_max_retries * (self.retry_backoff_max + self.task_time_limit))
        return span

    def redis_target(self, name: str = "celery_broker_url") -> RedisTarget:
        """The Redis that CELERY_BROKER_URL, REDIS_URL or CACHE_REDIS_URL (`name`) points at, TLS and
        Sentinel included."""
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
            if field.type in ("int", "int | None"):
                try:
                    values[field.name] = int(raw)
                except ValueError:
                    raise SettingsError(f"{field.name.upper()} must be an integer, got {raw!r}") from None
                if values[field.name] < 0:  # type: ignore[operator]
                    raise SettingsError(f"{field.name.upper()} must not be negative, got {raw!r}")
            else:
                values[field.name] = raw
        return cls(**values)  # type: ignore[arg-type]


# Integer settings: (smallest, largest) value that works; None: no upper limit.
INT_RANGES: dict[str, tuple[int, int | None]] = {
    "smtp_port": (1, 65535),
    "task_soft_time_limit": (1, None),
    "task_time_limit": (1, None),
    "task_retry_for_seconds": (1, None),
    "task_max_retries": (0, None),  # optional: None (unset) is no cap
    "retry_backoff_max": (1, None),
    "broker_visibility_timeout": (1, None),
    "dedup_ttl_seconds": (1, None),
    "ordered_chain_max_tasks": (0, 10_000),
    "ordered_chain_max_seconds": (0, None),
    "worker_event_flush_ms": (0, None),
    "listener_batch_size": (1, None),
    "listener_max_await_ms": (MIN_MAX_AWAIT_MS, None),
    "listener_checkpoint_interval_ms": (0, None),
    "listener_lease_ttl_seconds": (2, None),
    "listener_lease_renew_seconds": (1, None),
    "listener_max_stall_seconds": (1, None),
    "listener_max_queue_length": (0, None),
    "realtime_port": (0, 65535),
    "realtime_token_ttl": (1, None),
    "realtime_demo": (0, 1),
    "realtime_follower_batch_size": (1, None),
    "console_port": (0, 65535),
    "listener_metrics_port": (1, 65535),  # optional: None (unset) serves no metrics
    "worker_metrics_port": (1, 65535),
}


def settings_problems(settings: Settings) -> list[str]:
    """What is wrong with `settings`, one line each naming the variable (URLs masked); [] if nothing.

    Everything that can be checked without connecting anywhere: what would otherwise pass start-up
    and fail at run time (a port out of range, a URL scheme nobody here can use, a TTL of 0).
    """
    s = settings
    problems: list[str] = []
    for field in fields(s):
        name, value = field.name, getattr(s, field.name)
        if field.type not in ("int", "int | None") or value is None:
            continue
        low, high = INT_RANGES.get(name, (0, None))
        if value < low or (high is not None and value > high):
            limits = f"between {low} and {high}" if high is not None else f"at least {low}"
            problems.append(f"{name.upper()} must be {limits}, got {value}")
    if problems:
        return problems  # the relations below assume sane numbers
    for name in ("mongodb_uri", "mongodb_db", "celery_broker_url", "smtp_host", "mail_from"):
        if not getattr(s, name).strip():
            problems.append(f"{name.upper()} must not be empty")
    if problems:
        return problems
    problems += _mongodb_problems(s.mongodb_uri, s.mongodb_db)
    problems += _redis_url_problems("CELERY_BROKER_URL", s.celery_broker_url, BROKER_SCHEMES, s)
    problems += _redis_url_problems("REDIS_URL", s.redis_url, REDIS_SCHEMES, s)
    if s.realtime_redis_url != s.redis_url:
        problems += _redis_url_problems("REALTIME_REDIS_URL", s.realtime_redis_url, REDIS_SCHEMES, s)
    if not s.realtime_channel.strip():
        problems.append("REALTIME_CHANNEL must not be empty")
    if not s.metrics_host.strip() or any(c.isspace() for c in s.metrics_host):
        problems.append(f"METRICS_HOST must be a host name or address, got {s.metrics_host!r}")
    if not s.realtime_host.strip() or any(c.isspace() for c in s.realtime_host):
        problems.append(f"REALTIME_HOST must be a host name or address, got {s.realtime_host!r}")
    problems += _redis_url_problems("CACHE_REDIS_URL", s.cache_redis_url, REDIS_SCHEMES, s)
    if not s.console_user.strip() or ":" in s.console_user:
        problems.append("CONSOLE_USER must be a non-empty user name without ':' (HTTP basic auth)")
    if not s.console_host.strip() or any(c.isspace() for c in s.console_host):
        problems.append(f"CONSOLE_HOST must be a host name or address, got {s.console_host!r}")
    if s.flower_url and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", s.flower_url):
        problems.append(f"FLOWER_URL must be an http:// or https:// URL, got {mask_url(s.flower_url)}")
    sentinel_urls = [
        url
        for url in (s.celery_broker_url, s.redis_url, s.realtime_redis_url, s.cache_redis_url)
        if url.lower().startswith("sentinel://")
    ]
    if s.redis_sentinel_master and not sentinel_urls:
        problems.append(
            "REDIS_SENTINEL_MASTER is set, but none of CELERY_BROKER_URL, REDIS_URL, CACHE_REDIS_URL is "
            "sentinel://"
        )
    if any(c.isspace() for c in s.smtp_host):
        problems.append(f"SMTP_HOST must be a host name or address, got {s.smtp_host!r}")
    if "@" not in parseaddr(s.mail_from)[1]:
        problems.append(f"MAIL_FROM must hold an email address (name <user@domain>), got {s.mail_from!r}")
    if s.task_soft_time_limit >= s.task_time_limit:
        problems.append("TASK_SOFT_TIME_LIMIT must be smaller than TASK_TIME_LIMIT")
    if s.broker_visibility_timeout <= s.task_time_limit:
        problems.append("BROKER_VISIBILITY_TIMEOUT must be longer than TASK_TIME_LIMIT")
    elif s.retry_backoff_max + s.task_time_limit >= s.broker_visibility_timeout:
        problems.append("BROKER_VISIBILITY_TIMEOUT must exceed RETRY_BACKOFF_MAX + TASK_TIME_LIMIT")
    # A done record must outlive every redelivery (visibility timeout) and retry of its task; else
    # the copy runs the effect again.
    span = s.broker_visibility_timeout + s.retry_span_seconds()
    if s.dedup_ttl_seconds <= span:
        problems.append(
            f"DEDUP_TTL_SECONDS ({s.dedup_ttl_seconds}) must be longer than BROKER_VISIBILITY_TIMEOUT + "
            f"the retry span (TASK_RETRY_FOR_SECONDS + RETRY_BACKOFF_MAX + TASK_TIME_LIMIT, or "
            f"TASK_MAX_RETRIES x (RETRY_BACKOFF_MAX + TASK_TIME_LIMIT) if smaller) = {span} s, the "
            "longest a copy of a task can come back"
        )
    if s.listener_on_history_lost not in ("fail", "resume-now"):
        problems.append(
            f"LISTENER_ON_HISTORY_LOST must be fail or resume-now, got {s.listener_on_history_lost!r}"
        )
    if s.listener_publisher not in ("pipelined", "celery"):
        problems.append(f"LISTENER_PUBLISHER must be pipelined or celery, got {s.listener_publisher!r}")
    if not s.listener_stream_name.strip():
        problems.append("LISTENER_STREAM_NAME must not be empty")
    if not s.listener_lease_renew_seconds < s.listener_lease_ttl_seconds:
        problems.append("LISTENER_LEASE_RENEW_SECONDS must be smaller than LISTENER_LEASE_TTL_SECONDS")
    # The loop renews the lease and writes its heartbeat between getMores, which wait up to max-await.
    elif s.listener_max_await_ms >= (s.listener_lease_ttl_seconds - s.listener_lease_renew_seconds) * 1000:
        problems.append(
            "LISTENER_MAX_AWAIT_MS must be shorter than LISTENER_LEASE_TTL_SECONDS - "
            "LISTENER_LEASE_RENEW_SECONDS: the lease is renewed between getMores"
        )
    if s.listener_max_await_ms >= s.listener_max_stall_seconds * 1000:
        problems.append(
            "LISTENER_MAX_STALL_SECONDS must be longer than LISTENER_MAX_AWAIT_MS: an idle listener "
            "writes its heartbeat once per getMore"
        )
    return problems


def realtime_secret_problems(settings: Settings) -> list[str]:
    """Why REALTIME_SECRET cannot sign tokens (the gateway refuses to start); never shows the value."""
    secret = settings.realtime_secret
    hint = "e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if not secret:
        return [f"REALTIME_SECRET must be set: the realtime gateway signs client tokens with it ({hint})"]
    if len(secret) < MIN_REALTIME_SECRET_LENGTH:
        return [
            f"REALTIME_SECRET is too short ({len(secret)} characters): at least "
            f"{MIN_REALTIME_SECRET_LENGTH} ({hint})"
        ]
    return []


LOOPBACK = "127.0.0.1"


def console_password_problems(settings: Settings, host: str) -> list[str]:
    """Why the console may not serve on `host`: no CONSOLE_PASSWORD off 127.0.0.1; never shows it."""
    if not settings.console_password and host != LOOPBACK:
        return [
            f"CONSOLE_PASSWORD must be set: the console serves on {host}, not only on {LOOPBACK} "
            "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
        ]
    return []


def _mongodb_problems(uri: str, db: str) -> list[str]:
    problems = []
    try:
        parse_mongodb_uri(uri)
    except (PyMongoError, ValueError) as exc:
        why = scrub(str(exc), [uri])
        problems.append(f"MONGODB_URI is not a usable MongoDB URI ({mask_url(uri)}): {why}")
    # mongod's rules for database names.
    if any(c in db for c in '/\\. "$\0') or len(db.encode()) >= 64:
        problems.append(f'MONGODB_DB must be a database name (no /\\. "$, under 64 bytes), got {db!r}')
    return problems


def parse_mongodb_uri(uri: str) -> dict[str, object]:
    """pymongo's parse of a MongoDB URI, without any I/O: raises InvalidURI/ConfigurationError/ValueError.

    pymongo's public parse_uri resolves mongodb+srv:// names in DNS; its validation step before that
    is private (pymongo.uri_parser_shared._validate_uri), so an srv URI goes through that one only:
    tests/unit/test_settings.py fails should a pymongo upgrade move it.
    """
    if uri.startswith("mongodb+srv://"):
        from pymongo import uri_parser_shared

        return dict(uri_parser_shared._validate_uri(uri))
    return dict(uri_parser.parse_uri(uri))


def _redis_url_problems(name: str, url: str, schemes: tuple[str, ...], settings: Settings) -> list[str]:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in schemes:
        accepted = " or ".join(f"{s}://" for s in schemes)
        return [f"{name} must be a URL starting with {accepted}, got {mask_url(url)}"]
    if scheme != "unix":
        # TLS parameters, Sentinel and its master name, as every Redis client reads them.
        try:
            settings.redis_target(name.lower())
        except SettingsError as exc:
            if str(exc).startswith("REDIS_SENTINEL_MASTER"):
                return [str(exc)]
            return [f"{name} is not a usable Redis URL ({mask_url(url)}): {scrub(str(exc), [url])}"]
        return []
    try:
        redis.connection.parse_url(url)
    except ValueError as exc:
        return [f"{name} is not a usable Redis URL ({mask_url(url)}): {scrub(str(exc), [url])}"]
    return []


@cache
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()


# Which app `python -m listener`, `changeflow ...` run without -A/--app: a module as `celery -A` takes
# it (`acme.effects`, or `acme.effects:app`). Read on its own, before any app (and its settings) exists.
APP_VARIABLE = "CHANGEFLOW_APP"
DEFAULT_APP = "worker"  # this repository's app (tasks/app.py), as `celery -A worker` finds it
_APP_SPEC = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?")


def default_app_spec(env: Mapping[str, str] | None = None) -> str:
    """CHANGEFLOW_APP, else this repository's app; SettingsError naming the variable when malformed."""
    env = os.environ if env is None else env
    value = env.get(APP_VARIABLE, "").strip()
    if not value:
        return DEFAULT_APP
    if not _APP_SPEC.fullmatch(value):
        raise SettingsError(f"{APP_VARIABLE} must name a module (acme.effects[:app]), got {value!r}")
    return value
