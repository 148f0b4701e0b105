"""docker-compose.yml without Docker: published ports on 127.0.0.1 only, no secret in the file, and
compose's variable interpolation refusing to start without the secrets from .env.

`interpolate` follows compose's documented syntax (`$$`, `$VAR`, `${VAR}`, `${VAR:-default}`,
`${VAR-default}`, `${VAR:?error}`, `${VAR?error}`); YAML anchors and merge keys are resolved by the
YAML parser, as compose's own does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from changeflow.worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SECRETS = ("REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "REALTIME_SECRET", "CONSOLE_PASSWORD")
SECRET_NAMES = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|AUTH|API_KEY|CREDENTIAL", re.IGNORECASE)
# $$ | ${NAME[:?-]...} | $NAME: groups escaped, braced name, operator, argument, bare name.
REFERENCE = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)
PASSWORD = "0123456789abcdef" * 4  # what `secrets.token_hex(32)` gives: hex
FLOWER = "admin:fedcba9876543210"
REALTIME = "realtime-secret-" + "0123456789" * 4
CONSOLE = "console-password-0123456789"


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """`value` (the parsed file or a part of it) with compose's variables substituted from `env`."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        escaped, braced, operator, argument, bare = match.groups()
        if escaped:
            return "$"
        name = braced or bare
        current = env.get(name)
        unset = current is None or (current == "" and operator is not None and operator.startswith(":"))
        if operator is not None and operator.endswith("?") and unset:
            raise MissingVariable(f"required variable {name} is missing a value: {argument}")
        if operator is not None and operator.endswith("-") and unset:
            return argument
        return current or ""

    return REFERENCE.sub(substitute, value)


def load() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in `value` (keys included) with where it is."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{path}.{key}", str(key)
            yield from strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from strings(item, f"{path}[{index}]")
    elif isinstance(value, str):
        yield path, value


def host_ip(port: Any) -> str | None:
    """The host address a `ports` entry publishes on; None: every interface."""
    if isinstance(port, dict):  # the long syntax
        return port.get("host_ip")
    spec = str(port).split("/")[0]
    if spec.startswith("["):  # [::1]:8080:80
        return spec[1 : spec.index("]")]
    parts = spec.split(":")
    return parts[0] if len(parts) == 3 else None


def configured() -> dict[str, Any]:
    return interpolate(
        load(),
        {
            "REDIS_PASSWORD": PASSWORD,
            "FLOWER_BASIC_AUTH": FLOWER,
            "REALTIME_SECRET": REALTIME,
            "CONSOLE_PASSWORD": CONSOLE,
        },
    )


def test_every_published_port_is_bound_to_localhost() -> None:
    services = load()["services"]
    published = {name: service["ports"] for name, service in services.items() if "ports" in service}
    assert set(published) == {"mongo", "redis", "mailsink", "flower", "realtime", "console", "prometheus"}
    for name, ports in published.items():
        for port in ports:
            assert host_ip(port) == "127.0.0.1", f"{name} publishes {port!r} beyond this machine"
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name} would bypass the port bindings"


@pytest.mark.parametrize(
    ("port", "address"),
    [
        ("6379:6379", None),
        ("6379", None),
        ("127.0.0.1:6379:6379", "127.0.0.1"),
        ("0.0.0.0:6379:6379/tcp", "0.0.0.0"),
        ("[::1]:6379:6379", "::1"),
        ({"target": 6379, "published": 6379}, None),
        ({"target": 6379, "host_ip": "127.0.0.1"}, "127.0.0.1"),
    ],
)
def test_host_ip_reads_both_port_syntaxes(port: Any, address: str | None) -> None:
    assert host_ip(port) == address


def test_no_secret_is_written_in_the_file() -> None:
    for path, text in strings(load()):
        for match in REFERENCE.finditer(text):
            name = match.group(2) or match.group(5)
            if name in SECRETS:
                assert match.group(3) == ":?", f"{path}: {name} must be ${{{name}:?...}}, no default"
    configured_strings = dict(strings(configured()))
    for path, text in configured_strings.items():
        # Every Redis URL carries exactly the password from .env, and nothing else is a password.
        for url in re.findall(r"rediss?://\S+", text):
            assert urlsplit(url).password == PASSWORD, f"{path}: {url}"
    environments = {
        f"{name}.{key}": value
        for name, service in load()["services"].items()
        for key, value in (service.get("environment") or {}).items()
    }
    secret_like = {key: value for key, value in environments.items() if SECRET_NAMES.search(key)}
    assert secret_like  # REDISCLI_AUTH, FLOWER_BASIC_AUTH: the check below sees them
    for key, value in secret_like.items():
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), f"{key} is written in the file: {value!r}"


def test_compose_refuses_to_start_without_the_secrets() -> None:
    with pytest.raises(MissingVariable, match=r"REDIS_PASSWORD is missing a value: set REDIS_PASSWORD in \."):
        interpolate(load(), {"FLOWER_BASIC_AUTH": FLOWER, "REALTIME_SECRET": REALTIME})
    with pytest.raises(MissingVariable, match="FLOWER_BASIC_AUTH is missing a value: set FLOWER_BASIC_AUTH"):
        interpolate(load(), {"REDIS_PASSWORD": PASSWORD, "REALTIME_SECRET": REALTIME})
    with pytest.raises(MissingVariable, match="REALTIME_SECRET is missing a value: set REALTIME_SECRET"):
        interpolate(load(), {"REDIS_PASSWORD": PASSWORD, "FLOWER_BASIC_AUTH": FLOWER})
    with pytest.raises(MissingVariable, match="CONSOLE_PASSWORD is missing a value: set CONSOLE_PASSWORD"):
        interpolate(
            load(), {"REDIS_PASSWORD": PASSWORD, "FLOWER_BASIC_AUTH": FLOWER, "REALTIME_SECRET": REALTIME}
        )
    with pytest.raises(MissingVariable, match="REDIS_PASSWORD"):  # set but empty: refused too
        interpolate(load(), {"REDIS_PASSWORD": "", "FLOWER_BASIC_AUTH": FLOWER, "REALTIME_SECRET": REALTIME})


def test_the_password_redis_requires_is_the_one_every_client_uses() -> None:
    services = configured()["services"]
    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == PASSWORD
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == PASSWORD  # the healthcheck's redis-cli
    assert services["realtime"]["environment"]["REALTIME_SECRET"] == REALTIME
    assert services["console"]["environment"]["CONSOLE_PASSWORD"] == CONSOLE
    for name in ("listener", "worker", "flower", "realtime", "console"):
        environment = services[name]["environment"]
        settings = Settings.from_env(environment)
        for url in (settings.celery_broker_url, settings.redis_url, settings.cache_redis_url):
            parts = urlsplit(url)
            assert (parts.hostname, parts.port, parts.password) == ("redis", 6379, PASSWORD), name
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == FLOWER
    assert "FLOWER_BASIC_AUTH" not in services["worker"]["environment"]


def test_env_file_is_ignored_by_git() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/.env" in ignored or ".env" in ignored


@pytest.mark.parametrize(
    ("text", "env", "result"),
    [
        ("$$HOME", {}, "$HOME"),
        ("${A}-$B", {"A": "1", "B": "2"}, "1-2"),
        ("${A:-x}", {"A": ""}, "x"),
        ("${A-x}", {"A": ""}, ""),
        ("${A:?why}", {"A": "ok"}, "ok"),
    ],
)
def test_interpolate(text: str, env: dict[str, str], result: str) -> None:
    assert interpolate(text, env) == result


def test_prometheus_scrapes_the_listener_the_workers_and_flower_where_they_serve() -> None:
    services = configured()["services"]
    scrape = yaml.safe_load((COMPOSE.parent / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    targets = {
        name: [(sd["names"], sd["port"]) for sd in job.get("dns_sd_configs", [])]
        + [(c["targets"], None) for c in job.get("static_configs", [])]
        for name, job in jobs.items()
    }
    for service in ("listener", "worker"):
        settings = Settings.from_env(services[service]["environment"])
        port = settings.listener_metrics_port if service == "listener" else settings.worker_metrics_port
        assert targets[f"changeflow-{service}"] == [([service], port)]
        assert settings.metrics_host == "0.0.0.0"  # reachable from the prometheus container
    flower = services["flower"]["command"]
    assert targets["flower"] == [(["flower:5555"], None)] and "--port=5555" in flower
    # Flower asks for its basic auth: the user replaces FLOWER_USER at start, the password goes to a file.
    assert jobs["flower"]["basic_auth"] == {
        "username": "FLOWER_USER", "password_file": "/prometheus/flower_password"
    }  # fmt: skip
    prometheus = services["prometheus"]
    assert prometheus["environment"]["FLOWER_BASIC_AUTH"] == FLOWER
    start = prometheus["command"][0]
    assert 'sed "s/FLOWER_USER/${auth%%:*}/"' in start and "/prometheus/flower_password" in start
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert scrape["rule_files"] == ["alerts.yml"]
