"""One reading of changeflow's Redis URLs, for every Redis client it makes.

The Celery broker (kombu), the dedup store and the listener's pipelined publisher (redis-py) all take
their Redis from here, so a URL means the same server, database, credentials and TLS checks to all
three. Two kinds of URL:

- `redis://` / `rediss://[USER:PASSWORD@]HOST[:PORT][/DB][?PARAMS]`: one server; `rediss` is TLS.
  TLS verifies the server's certificate and host name unless the URL says otherwise:
    ssl_cert_reqs       required | optional | none, or CERT_REQUIRED | CERT_OPTIONAL | CERT_NONE
                        (any case; the spellings of redis-py and of kombu). Default: required.
    ssl_ca_certs        the CA bundle (PEM) to verify with; default: the system's CAs.
    ssl_certfile, ssl_keyfile   a client certificate, when the server asks for one.
    ssl_check_hostname  true | false; default: true when certificates are required.
  kombu alone would connect to a bare `rediss://` without checking the certificate (with a warning):
  here the broker gets the same explicit options (`broker_use_ssl`) as the other clients.
- `unix://[:PASSWORD@]/PATH/TO/SOCKET[?db=N]`: a local socket (redis-py; the dedup store only).
- `sentinel://[:PASSWORD@]HOST[:PORT][/DB];sentinel://HOST2[:PORT2][/DB]...` (kombu's form): Redis
  Sentinel. The sentinels are asked for the current master of REDIS_SENTINEL_MASTER; the password (of
  the first URL) and the database (the same on every URL) are the master's. Sentinels themselves are
  reached without password or TLS.

Pure parsing (`parse_redis_url`) is separate from making clients (`RedisTarget.client`), so the rules
are unit-tested without a server. Error messages name the setting and never show the URL's password.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
SCHEMES = ("redis", "rediss", "unix", "sentinel")
# The spellings redis-py documents (required/optional/none) and kombu's (the ssl module's names).
CERT_REQS: dict[str, ssl.VerifyMode] = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
    "cert_required": ssl.CERT_REQUIRED,
    "cert_optional": ssl.CERT_OPTIONAL,
    "cert_none": ssl.CERT_NONE,
}
TLS_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class RedisUrlError(ValueError):
    """A Redis URL (or its Sentinel master name) changeflow cannot use; the message names the setting."""


@dataclass(frozen=True)
class Tls:
    """TLS options of a `rediss://` URL, as keyword arguments both redis-py and kombu take."""

    cert_reqs: ssl.VerifyMode = ssl.CERT_REQUIRED
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    check_hostname: bool = True

    def options(self) -> dict[str, Any]:
        """redis-py's SSLConnection arguments; also what kombu's `broker_use_ssl` passes on to it."""
        options: dict[str, Any] = {
            "ssl_cert_reqs": self.cert_reqs,
            "ssl_check_hostname": self.check_hostname,
        }
        for name in ("ca_certs", "certfile", "keyfile"):
            value = getattr(self, name)
            if value:
                options[f"ssl_{name}"] = value
        return options


@dataclass(frozen=True)
class RedisTarget:
    """Where a Redis URL points: one server, or the master a set of sentinels names."""

    hosts: tuple[tuple[str, int], ...]  # the server, or the sentinels
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    tls: Tls | None = None
    master_name: str | None = None  # set for Sentinel
    unix_path: str | None = None  # set for unix:// (a local socket; the dedup store only)
    # The URL for kombu: TLS parameters removed (they go in broker_use_ssl).
    kombu_url: str = field(default="", repr=False)

    @property
    def sentinel(self) -> bool:
        return self.master_name is not None

    def client(self, **options: Any) -> redis.Redis:
        """A redis-py client for this target; `options` are redis-py's (socket_timeout, retry, ...).

        Sentinel: a client of the current master (redis-py's master_for); each new connection asks
        the sentinels, so after a failover the next connection goes to the new master.
        """
        auth = {"username": self.username, "password": self.password, "db": self.db}
        if self.master_name is not None:
            # Sentinels: same timeouts, no credentials (they are the master's).
            sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
            sentinels = redis.sentinel.Sentinel(list(self.hosts), sentinel_kwargs=sentinel_options)
            return sentinels.master_for(self.master_name, **auth, **options)
        if self.unix_path is not None:
            return redis.Redis(unix_socket_path=self.unix_path, **auth, **options)
        host, port = self.hosts[0]
        tls: dict[str, Any] = {"ssl": True, **self.tls.options()} if self.tls is not None else {}
        return redis.Redis(host=host, port=port, **auth, **tls, **options)

    def async_client(self, **options: Any) -> redis.asyncio.Redis:
        """client(), for asyncio (redis.asyncio): the realtime gateway's pub/sub subscription."""
        auth = {"username": self.username, "password": self.password, "db": self.db}
        if self.master_name is not None:
            sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
            sentinels = redis.asyncio.sentinel.Sentinel(list(self.hosts), sentinel_kwargs=sentinel_options)
            return sentinels.master_for(self.master_name, **auth, **options)
        if self.unix_path is not None:
            return redis.asyncio.Redis(unix_socket_path=self.unix_path, **auth, **options)
        host, port = self.hosts[0]
        tls: dict[str, Any] = {"ssl": True, **self.tls.options()} if self.tls is not None else {}
        return redis.asyncio.Redis(host=host, port=port, **auth, **tls, **options)

    def kombu_config(self) -> dict[str, Any]:
        """Celery's broker_url, broker_use_ssl and the transport options this target needs."""
        return {
            "broker_url": self.kombu_url,
            # Explicit even for a bare rediss://, where kombu would default to CERT_NONE.
            "broker_use_ssl": self.tls.options() if self.tls is not None else None,
            "transport_options": {"master_name": self.master_name} if self.master_name is not None else {},
        }


def parse_redis_url(url: str, *, master_name: str = "", setting: str = "CELERY_BROKER_URL") -> RedisTarget:
    """Read a changeflow Redis URL (see the module doc); raises RedisUrlError naming `setting`."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise RedisUrlError(
            f"{setting} must be a redis://, rediss://, unix:// or sentinel:// URL, got {mask(url)!r}"
        )
    if scheme == "sentinel":
        if not master_name:
            raise RedisUrlError(
                f"REDIS_SENTINEL_MASTER must name the Sentinel master: {setting} is a sentinel:// URL"
            )
        return _parse_sentinel(url, master_name, setting)
    if scheme == "unix":
        return _parse_unix(url, setting)
    return _parse_server(url, setting)


def _parse_unix(url: str, setting: str) -> RedisTarget:
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    if not parts.path:
        raise RedisUrlError(f"{setting}: a unix:// URL needs the socket's path")
    return RedisTarget(
        hosts=(),
        db=_db("", params.get("db"), setting) if params.get("db") else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        unix_path=unquote(parts.path),
        kombu_url=url,
    )


def _parse_server(url: str, setting: str) -> RedisTarget:
    parts = _split(url, setting)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    tls_params = {key: params.pop(key) for key in TLS_PARAMS if key in params}
    if parts.scheme == "redis" and tls_params:
        raise RedisUrlError(f"{setting}: TLS parameters ({', '.join(tls_params)}) need a rediss:// URL")
    tls = _tls(tls_params, setting) if parts.scheme == "rediss" else None
    db = _db(parts.path, params.pop("db", None), setting)
    rest = urlencode(params)  # anything else: kombu's own
    kombu_url = url.split("?", 1)[0] + (f"?{rest}" if rest else "")
    return RedisTarget(
        hosts=((parts.hostname or "localhost", _port(parts, DEFAULT_PORT, setting)),),
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
        kombu_url=kombu_url,
    )


def _parse_sentinel(url: str, master_name: str, setting: str) -> RedisTarget:
    hosts = []
    dbs: set[int] = set()
    first = None
    for one in url.split(";"):
        parts = _split(one.strip(), setting)
        if parts.scheme != "sentinel":
            raise RedisUrlError(f"{setting}: each URL of a Sentinel list must be sentinel://: {mask(one)!r}")
        if parts.query:
            # kombu's sentinel transport reads no parameters from the URL; TLS with Sentinel is not
            # supported (the sentinels would need it too).
            raise RedisUrlError(f"{setting}: sentinel:// URLs take no ?parameters (TLS is not supported)")
        hosts.append((parts.hostname or "localhost", _port(parts, DEFAULT_SENTINEL_PORT, setting)))
        dbs.add(_db(parts.path, None, setting))
        first = first or parts
    assert first is not None
    if len(dbs) > 1:
        # kombu reads the database of whichever URL it uses: they must not differ (none means 0).
        raise RedisUrlError(f"{setting}: every URL of a Sentinel list must name the same /DB (none means 0)")
    return RedisTarget(
        hosts=tuple(hosts),
        db=dbs.pop(),
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
        master_name=master_name,
        kombu_url=url,
    )


def _split(url: str, setting: str) -> Any:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise RedisUrlError(f"{setting} has an invalid port: {mask(url)!r}") from None
    return parts


def _port(parts: Any, default: int, setting: str) -> int:
    port = parts.port
    if port is None:
        return default
    if not 1 <= port <= 65535:
        raise RedisUrlError(f"{setting} has an invalid port: {port}")
    return int(port)


def _db(path: str, query_db: str | None, setting: str) -> int:
    text = query_db if query_db is not None else unquote(path).strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise RedisUrlError(f"{setting}: the database must be a number, got {text!r}")
    return int(text)


def _tls(params: dict[str, str], setting: str) -> Tls:
    raw = params.get("ssl_cert_reqs")
    cert_reqs = ssl.CERT_REQUIRED
    if raw is not None:
        found = CERT_REQS.get(raw.strip().lower())
        if found is None:
            raise RedisUrlError(
                f"{setting}: ssl_cert_reqs must be required, optional or none "
                f"(or CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE), got {raw!r}"
            )
        cert_reqs = found
    check_hostname = cert_reqs == ssl.CERT_REQUIRED
    if "ssl_check_hostname" in params:
        text = params["ssl_check_hostname"].strip().lower()
        if text not in BOOLEANS:
            raise RedisUrlError(f"{setting}: ssl_check_hostname must be true or false, got {text!r}")
        check_hostname = BOOLEANS[text]
        if check_hostname and cert_reqs != ssl.CERT_REQUIRED:
            raise RedisUrlError(f"{setting}: ssl_check_hostname=true needs ssl_cert_reqs=required")
    return Tls(
        cert_reqs=cert_reqs,
        ca_certs=params.get("ssl_ca_certs") or None,
        certfile=params.get("ssl_certfile") or None,
        keyfile=params.get("ssl_keyfile") or None,
        check_hostname=check_hostname,
    )


def mask(url: str) -> str:
    """`url` with any password replaced by `**` (also in each URL of a Sentinel list)."""
    masked = []
    for one in url.split(";"):
        parts = urlsplit(one)
        if parts.password:
            user = parts.username or ""
            host = one.split("@", 1)[1] if "@" in one else ""
            one = f"{parts.scheme}://{user}:**@{host}"
        masked.append(one)
    return ";".join(masked)


def target_of_app(conf: Any) -> RedisTarget:
    """The target a Celery app's configuration (as celery_config made it) points at.

    The inverse of `RedisTarget.kombu_config`: its broker_url, broker_use_ssl (TLS options as
    redis-py arguments) and the transport option master_name.
    """
    options = conf.broker_transport_options or {}
    target = parse_redis_url(conf.broker_url, master_name=options.get("master_name") or "")
    use_ssl = conf.broker_use_ssl
    if target.tls is not None and isinstance(use_ssl, dict):
        target = _with_tls(target, use_ssl)
    return target


def _with_tls(target: RedisTarget, use_ssl: dict[str, Any]) -> RedisTarget:
    reqs = use_ssl.get("ssl_cert_reqs", ssl.CERT_REQUIRED)
    if isinstance(reqs, str):
        reqs = _tls({"ssl_cert_reqs": reqs}, "broker_use_ssl").cert_reqs
    tls = Tls(
        cert_reqs=ssl.VerifyMode(reqs),
        ca_certs=use_ssl.get("ssl_ca_certs"),
        certfile=use_ssl.get("ssl_certfile"),
        keyfile=use_ssl.get("ssl_keyfile"),
        check_hostname=bool(use_ssl.get("ssl_check_hostname", True)),
    )
    return replace(target, tls=tls)
