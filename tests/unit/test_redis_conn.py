"""worker.redis_conn: one reading of Redis URLs for kombu and redis-py (TLS, Sentinel), no server needed."""

from __future__ import annotations

import ssl

import pytest
from celery import Celery
from kombu import Connection

from changeflow.worker import broker
from changeflow.worker.app import celery_config
from changeflow.worker.redis_conn import RedisUrlError, Tls, mask, parse_redis_url, target_of_app
from changeflow.worker.settings import Settings, SettingsError


def test_plain_url() -> None:
    target = parse_redis_url("redis://:pw@example.test:6390/3")
    assert target.hosts == (("example.test", 6390),) and target.db == 3 and target.password == "pw"
    assert target.tls is None and not target.sentinel
    assert target.kombu_url == "redis://:pw@example.test:6390/3"


def test_defaults() -> None:
    target = parse_redis_url("redis://example.test")
    assert target.hosts == (("example.test", 6379),) and target.db == 0 and target.password is None


def test_bare_rediss_verifies_certificate_and_host_name() -> None:
    target = parse_redis_url("rediss://example.test:6380/0")
    assert target.tls == Tls(cert_reqs=ssl.CERT_REQUIRED, check_hostname=True)
    config = target.kombu_config()
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    assert config["broker_url"] == "rediss://example.test:6380/0"


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("required", ssl.CERT_REQUIRED),
        ("CERT_REQUIRED", ssl.CERT_REQUIRED),
        ("Cert_Required", ssl.CERT_REQUIRED),
        ("optional", ssl.CERT_OPTIONAL),
        ("CERT_OPTIONAL", ssl.CERT_OPTIONAL),
        ("none", ssl.CERT_NONE),
        ("NONE", ssl.CERT_NONE),
        ("CERT_NONE", ssl.CERT_NONE),
    ],
)
def test_cert_reqs_spellings_of_redis_py_and_kombu(spelling: str, expected: ssl.VerifyMode) -> None:
    tls = parse_redis_url(f"rediss://h/0?ssl_cert_reqs={spelling}").tls
    assert tls is not None and tls.cert_reqs == expected
    # Host names are only checked along with certificates (ssl refuses check_hostname without them).
    assert tls.check_hostname == (expected == ssl.CERT_REQUIRED)


def test_tls_files_and_host_name_check() -> None:
    target = parse_redis_url(
        "rediss://h/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_check_hostname=false"
    )
    assert target.tls == Tls(ca_certs="/ca.pem", certfile="/c.pem", keyfile="/k.pem", check_hostname=False)
    assert target.kombu_url == "rediss://h/0"  # TLS options go to kombu as broker_use_ssl
    assert target.kombu_config()["broker_use_ssl"] == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": False,
        "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
    }


def test_other_parameters_stay_for_kombu() -> None:
    assert parse_redis_url("rediss://h/0?ssl_cert_reqs=none&foo=1").kombu_url == "rediss://h/0?foo=1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be required, optional or none"),
        ("redis://h/0?ssl_cert_reqs=none", "need a rediss:// URL"),
        ("rediss://h/0?ssl_check_hostname=perhaps", "ssl_check_hostname must be true or false"),
        ("rediss://h/0?ssl_cert_reqs=none&ssl_check_hostname=true", "needs ssl_cert_reqs=required"),
        ("http://:secret@h/0", "must be a redis://, rediss://, unix:// or sentinel:// URL"),
        ("redis://:secret@h:99999/0", "invalid port"),
        ("redis://:secret@h/x", "database must be a number"),
    ],
)
def test_bad_urls_are_refused_naming_the_setting_without_the_password(url: str, message: str) -> None:
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url(url, setting="REDIS_URL")
    assert message in str(caught.value) and "REDIS_URL" in str(caught.value)
    assert "secret" not in str(caught.value)


def test_unix_socket_url() -> None:
    target = parse_redis_url("unix://:pw@/run/redis.sock?db=2", setting="REDIS_URL")
    assert target.unix_path == "/run/redis.sock" and target.db == 2 and target.password == "pw"
    assert target.hosts == () and target.tls is None and not target.sentinel


def test_sentinel_url_in_kombus_form() -> None:
    url = "sentinel://:pw@s1:26380/2;sentinel://s2/2;sentinel://s3:26390/2"
    target = parse_redis_url(url, master_name="mymaster")
    assert target.sentinel and target.master_name == "mymaster"
    assert target.hosts == (("s1", 26380), ("s2", 26379), ("s3", 26390))
    assert target.db == 2 and target.password == "pw"
    assert target.kombu_config() == {
        "broker_url": url,
        "broker_use_ssl": None,
        "transport_options": {"master_name": "mymaster"},
    }


def test_sentinel_needs_the_master_name() -> None:
    with pytest.raises(RedisUrlError, match="REDIS_SENTINEL_MASTER"):
        parse_redis_url("sentinel://s1:26379")


def test_sentinel_refuses_mixed_lists_and_parameters() -> None:
    with pytest.raises(RedisUrlError, match="each URL of a Sentinel list"):
        parse_redis_url("sentinel://s1;redis://h", master_name="m")
    with pytest.raises(RedisUrlError, match="the same /DB"):
        parse_redis_url("sentinel://s1;sentinel://s2/1", master_name="m")
    with pytest.raises(RedisUrlError, match="TLS is not supported"):
        parse_redis_url("sentinel://s1?ssl_cert_reqs=none", master_name="m")


def test_mask_hides_every_password() -> None:
    assert mask("sentinel://:a@s1:1/0;sentinel://u:b@s2:2") == "sentinel://:**@s1:1/0;sentinel://u:**@s2:2"
    assert mask("redis://h/0") == "redis://h/0"


def test_repr_shows_no_password() -> None:
    assert "pw" not in repr(parse_redis_url("redis://:pw@h/0"))


# -- the settings and the Celery app -----------------------------------------------------------------


def test_settings_refuse_a_sentinel_url_without_master_name() -> None:
    with pytest.raises(SettingsError, match="REDIS_SENTINEL_MASTER"):
        Settings.from_env({"CELERY_BROKER_URL": "sentinel://s1:26379"})


def test_settings_refuse_a_sentinel_master_without_a_sentinel_url() -> None:
    with pytest.raises(SettingsError, match="REDIS_SENTINEL_MASTER is set, but"):
        Settings.from_env({"CELERY_BROKER_URL": "redis://h:6379/0", "REDIS_SENTINEL_MASTER": "m"})


def test_settings_refuse_a_bad_dedup_url_naming_it() -> None:
    with pytest.raises(SettingsError, match="REDIS_URL"):
        Settings.from_env({"REDIS_URL": "rediss://h/0?ssl_cert_reqs=sometimes"})


def _app(settings: Settings) -> Celery:
    app = Celery("redis-conn-test", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def test_celery_config_verifies_a_bare_rediss_broker() -> None:
    app = _app(Settings(celery_broker_url="rediss://h:6380/0"))
    broker.install()
    connection = app.connection_for_write()
    # kombu's own default for a bare rediss:// would be {"ssl_cert_reqs": CERT_NONE}.
    assert connection.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    assert connection.transport_cls == "rediss"


def test_celery_config_gives_kombu_the_sentinel_master() -> None:
    settings = Settings(
        celery_broker_url="sentinel://s1:26379;sentinel://s2:26379", redis_sentinel_master="m"
    )
    app = _app(settings)
    broker.install()
    connection: Connection = app.connection_for_write()
    assert isinstance(connection.transport, broker.SentinelTransport)
    assert connection.transport_options["master_name"] == "m"
    assert connection.transport_options["visibility_timeout"] == settings.broker_visibility_timeout


@pytest.mark.parametrize(
    ("url", "master"),
    [
        ("redis://:pw@h:6390/3", ""),
        ("rediss://h/1?ssl_cert_reqs=CERT_NONE", ""),
        ("rediss://h/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem", ""),
        ("rediss://h/0?ssl_cert_reqs=optional&ssl_check_hostname=false", ""),
        ("sentinel://:pw@s1:26380/2;sentinel://s2/2", "mymaster"),
    ],
)
def test_the_publisher_reads_from_the_app_what_the_settings_say(url: str, master: str) -> None:
    """The listener's publisher gets its target from the app's configuration: the same as the URL's."""
    app = _app(Settings(celery_broker_url=url, redis_sentinel_master=master))
    assert target_of_app(app.conf) == parse_redis_url(url, master_name=master)
