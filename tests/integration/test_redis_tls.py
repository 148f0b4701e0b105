"""TLS to Redis for all three of changeflow's Redis users, on a redis-server serving TLS only.

The server's certificate is signed by a private CA made with openssl for the test, so only a client
given that CA (`ssl_ca_certs`) can verify it. The broker (kombu, as the workers connect), the dedup
store and the listener's pipelined publisher must work with the CA, and refuse, with a certificate
error and nothing written, when verification is on and the certificate is not trusted: a bare
rediss:// included (kombu's own default would connect without checking).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kombu.exceptions
import pytest
import redis
from celery import Celery
from kombu import Exchange, Queue

from changeflow.listener.pipelined import PipelinedPublisher
from changeflow.listener.publish import BrokerUnavailable, Message
from changeflow.worker import broker
from changeflow.worker.app import celery_config
from changeflow.worker.dedup import DedupStore
from changeflow.worker.settings import Settings
from harness.redis_server import RedisServer
from harness.tls import TlsFiles, make_certificates


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that did not sign the server's certificate."""
    return make_certificates(tmp_path_factory.mktemp("other-tls"), name="someone-else").ca


@pytest.fixture(scope="module")
def tls_server(certificates: TlsFiles) -> Iterator[RedisServer]:
    with RedisServer(tls=certificates) as server:
        yield server


@pytest.fixture
def server_client(tls_server: RedisServer) -> Iterator[redis.Redis]:
    client = tls_server.client()
    client.flushall()
    yield client
    client.close()


def url(server: RedisServer, query: str = "") -> str:
    return f"rediss://127.0.0.1:{server.port}/0" + (f"?{query}" if query else "")


def app_for(broker_url: str) -> Celery:
    app = Celery("tls-test", set_as_current=False)
    app.conf.update(celery_config(Settings(celery_broker_url=broker_url)))
    app.conf.broker_connection_timeout = 2
    return app


def broker_round_trip(broker_url: str) -> object:
    """Publish and fetch one message through kombu as a worker's connection would make it."""
    broker.install()
    app = app_for(broker_url)
    queue = Queue("tls-test", Exchange("tls-test"), routing_key="tls-test")
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            connection.Producer().publish(
                {"n": 1}, exchange=queue.exchange, routing_key="tls-test", declare=[queue]
            )
            message = queue(connection.default_channel).get(no_ack=True)
            return None if message is None else message.payload
    finally:
        app.close()


def dedup_mark(redis_url: str) -> None:
    store = DedupStore.from_settings(Settings(redis_url=redis_url))
    try:
        store.mark_done("tls-key", "owner")
    finally:
        store.client.close()


def publish_one(broker_url: str) -> None:
    publisher = PipelinedPublisher(app_for(broker_url))
    try:
        publisher.publish([Message("tasks.create_profile", "tls-task-id", {"_id": {"_data": "01"}})])
    finally:
        publisher.close()


def test_all_three_work_with_the_ca_given(
    tls_server: RedisServer, certificates: TlsFiles, server_client: redis.Redis
) -> None:
    with_ca = url(tls_server, f"ssl_ca_certs={certificates.ca}")
    assert broker_round_trip(with_ca) == {"n": 1}
    dedup_mark(with_ca)
    assert server_client.get("changeflow:done:tls-key") == b"ok"
    publish_one(with_ca)
    assert server_client.llen("celery") == 1


@pytest.mark.parametrize(
    "query",
    [
        "",  # bare rediss://: verification on, with the system's CAs, which do not know the private CA
        "ssl_cert_reqs=required",
        "ssl_cert_reqs=CERT_REQUIRED",
        "ssl_ca_certs={other_ca}",
    ],
)
def test_all_three_refuse_an_untrusted_certificate(
    tls_server: RedisServer, other_ca: Path, server_client: redis.Redis, query: str
) -> None:
    untrusted = url(tls_server, query.format(other_ca=other_ca))
    with pytest.raises(kombu.exceptions.OperationalError, match="certificate verify failed"):
        broker_round_trip(untrusted)
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        dedup_mark(untrusted)
    with pytest.raises(BrokerUnavailable, match="certificate verify failed"):
        publish_one(untrusted)
    assert server_client.dbsize() == 0  # nothing got through


@pytest.mark.parametrize("spelling", ["none", "CERT_NONE", "Cert_None"])
def test_unverified_only_when_the_url_says_so(
    tls_server: RedisServer, server_client: redis.Redis, spelling: str
) -> None:
    unverified = url(tls_server, f"ssl_cert_reqs={spelling}")
    assert broker_round_trip(unverified) == {"n": 1}
    dedup_mark(unverified)
    publish_one(unverified)
    assert server_client.get("changeflow:done:tls-key") == b"ok" and server_client.llen("celery") == 1


def test_host_name_is_checked(tls_server: RedisServer, certificates: TlsFiles) -> None:
    """The certificate names 127.0.0.1 and localhost; another name for the same server is refused."""
    import socket

    hostname = socket.gethostname()
    try:
        socket.create_connection((hostname, tls_server.port), timeout=1).close()
    except OSError:
        pytest.skip(f"the server (bound to 127.0.0.1) is not reachable as {hostname}")
    wrong_name = f"rediss://{hostname}:{tls_server.port}/0?ssl_ca_certs={certificates.ca}"
    with pytest.raises(redis.ConnectionError, match="match"):
        dedup_mark(wrong_name)
    ok_without_check = f"{wrong_name}&ssl_check_hostname=false"
    dedup_mark(ok_without_check)  # the certificate itself is still verified (the CA is given)
