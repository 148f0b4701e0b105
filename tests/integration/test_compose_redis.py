"""docker-compose.yml's Redis set-up, run with the real redis-server (Docker is not needed): the server
started with the compose service's own arguments requires the password from .env; the broker and
dedup-store URLs the services get authenticate with it through redis-py and kombu; the healthcheck's
redis-cli authenticates through REDISCLI_AUTH; Flower and a worker started with their compose
environment work, Flower asks for FLOWER_BASIC_AUTH, and neither logs the password."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from changeflow.worker.app import celery_config
from changeflow.worker.settings import Settings
from harness.ports import free_port
from harness.processes import flower_process, worker_process
from tests.unit.test_compose import FLOWER, PASSWORD, configured


def local(url: str, port: int) -> str:
    """A compose service URL (host `redis`) pointed at the server of this test."""
    assert "@redis:6379/" in url
    return url.replace("@redis:6379/", f"@127.0.0.1:{port}/")


@pytest.fixture
def compose() -> dict[str, Any]:
    return configured()["services"]


@pytest.fixture
def compose_redis(compose: dict[str, Any]) -> Iterator[int]:
    """redis-server with the compose service's arguments, on a free port of 127.0.0.1; its port."""
    command = compose["redis"]["command"]
    assert command[0] == "redis-server"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="changeflow-compose-redis-")
    # harness.redis_server.RedisServer takes no extra arguments; the same local settings as it uses.
    args = [
        shutil.which("redis-server") or "redis-server", *command[1:], "--port", str(port),
        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir,
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_redis_requires_the_password_every_service_has(compose: dict[str, Any], compose_redis: int) -> None:
    no_retry = Retry(NoBackoff(), 0)  # redis-py retries authentication errors as connection errors
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=compose_redis, retry=no_retry).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=compose_redis, password="not-it", retry=no_retry).ping()
    for name in ("listener", "worker", "flower"):
        settings = Settings.from_env(compose[name]["environment"])
        for url in (settings.celery_broker_url, settings.redis_url):
            client = redis.Redis.from_url(local(url, compose_redis))
            assert client.ping() is True, (name, url)
            client.close()


def test_celery_reaches_the_broker_and_logs_its_url_masked(
    compose: dict[str, Any], compose_redis: int
) -> None:
    environment = compose["worker"]["environment"]
    url = local(environment["CELERY_BROKER_URL"], compose_redis)
    app = Celery("changeflow-compose", set_as_current=False)
    app.conf.update(celery_config(Settings.from_env({**environment, "CELERY_BROKER_URL": url})))
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        assert connection.default_channel.client.ping() is True
        shown = connection.as_uri()  # what the worker's banner and Flower's "Broker:" line print
    assert PASSWORD not in shown
    assert shown == f"redis://:**@127.0.0.1:{compose_redis}/0"


def test_the_healthcheck_authenticates_through_rediscli_auth(
    compose: dict[str, Any], compose_redis: int
) -> None:
    test = compose["redis"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    argv = [test[1], "-p", str(compose_redis), *test[2:]]  # the compose command on this test's port
    assert PASSWORD not in " ".join(argv)  # not on a command line that `ps` shows
    base = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    healthy = subprocess.run(
        argv, env={**base, **compose["redis"]["environment"]}, capture_output=True, text=True, timeout=10
    )
    assert healthy.stdout.strip() == "PONG"
    refused = subprocess.run(argv, env=base, capture_output=True, text=True, timeout=10)
    assert "NOAUTH" in refused.stdout + refused.stderr


def service_env(compose: dict[str, Any], name: str, port: int) -> dict[str, str]:
    """The compose service's environment, with its Redis URLs pointed at this test's server."""
    environment = dict(compose[name]["environment"])
    for key in ("CELERY_BROKER_URL", "REDIS_URL"):
        environment[key] = local(environment[key], port)
    return environment


def test_flower_asks_for_the_basic_auth_of_its_setting_and_logs_no_password(
    compose: dict[str, Any], compose_redis: int, tmp_path: Path
) -> None:
    port = free_port()
    flower = flower_process(service_env(compose, "flower", compose_redis), port, log_dir=tmp_path)
    flower.start(timeout=60)
    try:
        url = f"http://127.0.0.1:{port}/workers"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        user, password = FLOWER.split(":", 1)
        wrong = urllib.request.Request(url, headers={"Authorization": basic(user, "not-it")})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(wrong, timeout=10)
        assert refused.value.code == 401
        right = urllib.request.Request(url, headers={"Authorization": basic(user, password)})
        with urllib.request.urlopen(right, timeout=10) as response:
            assert response.status == 200
        log = flower.log_text()
        assert f"redis://:**@127.0.0.1:{compose_redis}/0" in log  # the "Broker:" line, masked
        assert PASSWORD not in log
    finally:
        flower.stop()


def test_a_worker_on_the_compose_broker_logs_no_password(
    compose: dict[str, Any], compose_redis: int, tmp_path: Path
) -> None:
    worker = worker_process(service_env(compose, "worker", compose_redis), "compose-worker", log_dir=tmp_path)
    worker.start(timeout=60)  # "ready.": connected to the broker with the password
    try:
        log = worker.log_text()
        assert f"redis://:**@127.0.0.1:{compose_redis}/0" in log  # the banner's transport line
        assert PASSWORD not in log
    finally:
        worker.stop()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
