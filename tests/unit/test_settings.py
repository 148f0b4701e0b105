"""changeflow.worker.settings: every variable checked at start-up, URLs masked in every message."""

from __future__ import annotations

from dataclasses import fields

import pytest

from changeflow.worker.settings import (
    INT_RANGES,
    MASK,
    Settings,
    SettingsError,
    mask_url,
    parse_mongodb_uri,
    scrub,
    settings_problems,
)

SECRET = "hunter2"


def refused(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)
    return str(raised.value)


def test_the_defaults_are_valid() -> None:
    assert settings_problems(Settings()) == []


def test_every_integer_setting_has_a_range() -> None:
    integers = {f.name for f in fields(Settings) if f.type in ("int", "int | None")}
    assert integers == set(INT_RANGES)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        # The cases of issue 10, item 4: each passed validation and failed at run time.
        ("DEDUP_TTL_SECONDS", "0", "DEDUP_TTL_SECONDS must be at least 1"),
        ("SMTP_PORT", "99999", "SMTP_PORT must be between 1 and 65535"),
        ("SMTP_PORT", "0", "SMTP_PORT must be between 1 and 65535"),
        ("LISTENER_MAX_AWAIT_MS", "0", "LISTENER_MAX_AWAIT_MS must be at least 10"),
        ("LISTENER_BATCH_SIZE", "0", "LISTENER_BATCH_SIZE must be at least 1"),
        ("TASK_SOFT_TIME_LIMIT", "0", "TASK_SOFT_TIME_LIMIT must be at least 1"),
        ("RETRY_BACKOFF_MAX", "0", "RETRY_BACKOFF_MAX must be at least 1"),
        ("LISTENER_MAX_STALL_SECONDS", "0", "LISTENER_MAX_STALL_SECONDS must be at least 1"),
        ("LISTENER_LEASE_RENEW_SECONDS", "0", "LISTENER_LEASE_RENEW_SECONDS must be at least 1"),
        ("LISTENER_MAX_QUEUE_LENGTH", "-1", "LISTENER_MAX_QUEUE_LENGTH must not be negative"),
        ("SMTP_PORT", "many", "SMTP_PORT must be an integer"),
        ("SMTP_HOST", "mail host", "SMTP_HOST must be a host name"),
        ("MAIL_FROM", "changeflow", "MAIL_FROM must hold an email address"),
        ("MONGODB_DB", "app.db", "MONGODB_DB must be a database name"),
        ("MONGODB_DB", "x" * 64, "MONGODB_DB must be a database name"),
        ("LISTENER_STREAM_NAME", "  ", "LISTENER_STREAM_NAME must not be empty"),
        ("LISTENER_PUBLISHER", "fast", "LISTENER_PUBLISHER must be pipelined or celery"),
        ("LISTENER_ON_HISTORY_LOST", "skip", "LISTENER_ON_HISTORY_LOST must be fail or resume-now"),
    ],
)
def test_a_value_that_cannot_work_is_refused_naming_its_variable(
    variable: str, value: str, says: str
) -> None:
    assert says in refused({variable: value})


@pytest.mark.parametrize(
    ("env", "says"),
    [
        # Shorter than the redeliveries and retries of one task: the copy would run its effect again.
        ({"DEDUP_TTL_SECONDS": "3600"}, "DEDUP_TTL_SECONDS (3600) must be longer than"),
        ({"TASK_SOFT_TIME_LIMIT": "60"}, "TASK_SOFT_TIME_LIMIT must be smaller than TASK_TIME_LIMIT"),
        (
            {"BROKER_VISIBILITY_TIMEOUT": "60"},
            "BROKER_VISIBILITY_TIMEOUT must be longer than TASK_TIME_LIMIT",
        ),
        (
            {"BROKER_VISIBILITY_TIMEOUT": "300"},
            "BROKER_VISIBILITY_TIMEOUT must exceed RETRY_BACKOFF_MAX + TASK_TIME_LIMIT",
        ),
        ({"LISTENER_LEASE_RENEW_SECONDS": "6"}, "LISTENER_LEASE_RENEW_SECONDS must be smaller than"),
        # The lease is renewed between getMores: one that waits longer than the slack loses it.
        ({"LISTENER_MAX_AWAIT_MS": "4000"}, "LISTENER_MAX_AWAIT_MS must be shorter than LISTENER_LEASE_TTL"),
        (
            {"LISTENER_MAX_AWAIT_MS": "1500", "LISTENER_MAX_STALL_SECONDS": "1"},
            "LISTENER_MAX_STALL_SECONDS must be longer than LISTENER_MAX_AWAIT_MS",
        ),
    ],
)
def test_settings_that_contradict_each_other_are_refused(env: dict[str, str], says: str) -> None:
    assert says in refused(env)


def test_the_dedup_ttl_follows_the_retry_span() -> None:
    settings = Settings()
    span = settings.broker_visibility_timeout + settings.retry_span_seconds()
    assert span == 3600 + 3600 + 300 + 60  # visibility + TASK_RETRY_FOR_SECONDS + last wait and run
    assert Settings(task_max_retries=2).retry_span_seconds() == 2 * (300 + 60)  # the cap, when smaller
    Settings(dedup_ttl_seconds=span + 1)
    with pytest.raises(SettingsError, match=f"= {span} s"):
        Settings(dedup_ttl_seconds=span)


@pytest.mark.parametrize(
    ("variable", "url", "says"),
    [
        (
            "CELERY_BROKER_URL",
            f"amqp://guest:{SECRET}@rabbit//",
            "CELERY_BROKER_URL must be a URL starting with",
        ),
        ("CELERY_BROKER_URL", f"memory://:{SECRET}@x/", "CELERY_BROKER_URL must be a URL starting with"),
        (
            "CELERY_BROKER_URL",
            f"unix://:{SECRET}@/tmp/redis.sock",
            "CELERY_BROKER_URL must be a URL starting",
        ),
        ("CELERY_BROKER_URL", f"redis://:{SECRET}@localhost:99999/0", "CELERY_BROKER_URL is not a usable"),
        ("REDIS_URL", f"http://:{SECRET}@localhost/", "REDIS_URL must be a URL starting with"),
        ("REDIS_URL", f"redis://:{SECRET}@localhost:0x10/0", "REDIS_URL is not a usable Redis URL"),
        ("CACHE_REDIS_URL", f"http://:{SECRET}@cache/", "CACHE_REDIS_URL must be a URL starting with"),
        (
            "CACHE_REDIS_URL",
            f"rediss://:{SECRET}@cache/0?ssl_cert_reqs=maybe",
            "CACHE_REDIS_URL is not a usable",
        ),
        ("MONGODB_URI", f"mongodb://app:{SECRET}@db:99999/", "MONGODB_URI is not a usable MongoDB URI"),
        ("MONGODB_URI", f"postgres://app:{SECRET}@db/", "MONGODB_URI is not a usable MongoDB URI"),
        ("MONGODB_URI", f"mongodb://app:{SECRET}@db/?replicaSet=rs0&w=-3", "MONGODB_URI is not a usable"),
        ("MONGODB_URI", f"mongodb+srv://app:{SECRET}@db.example.test:27017/", "MONGODB_URI is not a usable"),
    ],
)
def test_bad_urls_are_refused_with_the_password_masked(variable: str, url: str, says: str) -> None:
    message = refused({variable: url})
    assert says in message
    assert SECRET not in message
    assert MASK in message  # the URL is shown, masked, so the operator sees which one


def test_urls_each_consumer_accepts_pass() -> None:
    Settings(celery_broker_url="rediss://:pw@cache.example.test:6380/1?ssl_cert_reqs=required")
    Settings(redis_url="unix:///run/redis/redis.sock?db=2")
    Settings(mongodb_uri="mongodb://app:p%40ss@db1:27017,db2:27018/admin?replicaSet=rs0&authSource=admin")


def test_the_cache_redis_defaults_to_redis_url_and_takes_tls_and_sentinel() -> None:
    assert Settings(redis_url="redis://dedup:6379/1").cache_redis_url == "redis://dedup:6379/1"
    assert Settings(celery_broker_url="redis://broker:6379/0").cache_redis_url == "redis://broker:6379/0"
    tls = Settings(cache_redis_url="rediss://:pw@cache.example.test:6380/3").redis_target("cache_redis_url")
    assert (tls.hosts, tls.db, tls.tls is not None) == ((("cache.example.test", 6380),), 3, True)
    sentinel = Settings(cache_redis_url="sentinel://s1:26379;sentinel://s2:26379", redis_sentinel_master="m")
    assert sentinel.redis_target("cache_redis_url").master_name == "m"
    assert "CACHE_REDIS_URL" in refused({"CACHE_REDIS_URL": "sentinel://s1:26379"})  # no master name


def test_an_srv_uri_is_checked_without_any_dns_lookup() -> None:
    # pymongo's public parse_uri would resolve the SRV record (nothing answers for .test names).
    parsed = parse_mongodb_uri("mongodb+srv://app:pw@cluster0.example.test/?retryWrites=true")
    assert parsed["fqdn"] == "cluster0.example.test" and parsed["password"] == "pw"
    Settings(mongodb_uri="mongodb+srv://app:pw@cluster0.example.test/")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@cache:6379/0", "redis://:****@cache:6379/0"),
        ("redis://default:s3cret@cache:6379/0", "redis://default:****@cache:6379/0"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("redis://user@cache/0", "redis://user@cache/0"),
        ("redis://cache/0?password=s3cret&db=1", "redis://cache/0?password=****&db=1"),
        ("mongodb://app:s3cret@a:1,b:2/db?replicaSet=rs0", "mongodb://app:****@a:1,b:2/db?replicaSet=rs0"),
        ("mongodb://app:p@ss/w@rd@host/", "mongodb://app:****@host/"),  # unescaped @ and / in it
        ("unix://:s3cret@/run/redis.sock?db=0", "unix://:****@/run/redis.sock?db=0"),
        (
            "sentinel://:a1@s1:26379;sentinel://:b2@s2:26379",
            "sentinel://:****@s1:26379;sentinel://:****@s2:26379",
        ),
        ("not a url", "not a url"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_scrub_hides_the_passwords_of_the_url_variables_wherever_they_appear(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:p%2Fw@cache:6379/0")
    monkeypatch.setenv("MONGODB_URI", f"mongodb://app:{SECRET}@db/")
    text = (
        "Error connecting to redis://:p%2Fw@cache:6379/0 with password p/w; "
        f"Traceback ... MongoClient('mongodb://app:{SECRET}@db/') ... {SECRET!r}"
    )
    cleaned = scrub(text)
    assert "p%2Fw" not in cleaned and "p/w" not in cleaned and SECRET not in cleaned
    assert "redis://:****@cache:6379/0" in cleaned and "mongodb://app:****@db/" in cleaned
