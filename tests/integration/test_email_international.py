"""Internationalized addresses (RFC 6531) through the real email tasks, smtplib and an aiosmtpd sink
that offers SMTPUTF8 or not: what arrives, byte for byte where it matters, or the dead letter saying
why nothing could. Tasks run in-process through `apply()` as in test_tasks.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from bson import ObjectId
from pymongo.database import Database

from changeflow.worker.dedup import get_dedup_store
from changeflow.worker.keys import dedup_key
from changeflow.worker.settings import Settings
from changeflow.worker.testing import configured
from harness.redis_server import RedisServer
from harness.smtp_sink import SmtpSink
from tasks.email import send_shipping_notification, send_welcome_email
from tests.integration.test_tasks import order_update, run, servers, user_insert

RLO, LRI, PDI = "\u202e", "\u2066", "\u2069"


@pytest.fixture
def utf8_sink() -> Iterator[SmtpSink]:
    with SmtpSink(smtputf8=True) as sink:
        yield sink


@pytest.fixture
def ascii_sink() -> Iterator[SmtpSink]:
    with SmtpSink(smtputf8=False) as sink:
        yield sink


@contextmanager
def worker_for(
    redis_server: RedisServer, sink: SmtpSink, mongodb_uri: str, db: Database, **more: str
) -> Iterator[Settings]:
    env = servers(redis_server, sink, MONGODB_URI=mongodb_uri, MONGODB_DB=db.name, **more)
    with configured(**env) as settings:
        yield settings


def test_smtputf8_server_gets_the_address_exactly(
    redis_server: RedisServer, utf8_sink: SmtpSink, mongodb_uri: str, db: Database
) -> None:
    mail_from = "Chängeflow <nö-reply@chängeflow.test>"
    with worker_for(redis_server, utf8_sink, mongodb_uri, db, MAIL_FROM=mail_from):
        event = user_insert({"_id": ObjectId(), "email": "jörg@exämple.test", "name": f"Jörg {RLO}Ünlü"})
        assert run(send_welcome_email, event).state == "SUCCESS"

    [message] = utf8_sink.wait_for(1)
    assert message.envelope_rcpt == ["jörg@exämple.test"]
    assert message.envelope_from == "nö-reply@chängeflow.test"
    assert "SMTPUTF8" in message.mail_options
    [to] = message["To"].addresses
    assert (to.addr_spec, to.display_name) == ("jörg@exämple.test", "Jörg Ünlü")  # the RLO is gone
    [sender] = message["From"].addresses
    assert (sender.addr_spec, sender.display_name) == ("nö-reply@chängeflow.test", "Chängeflow")
    assert "jörg@exämple.test".encode() in message.raw  # UTF-8 on the wire, not an encoded word
    assert "Hello Jörg Ünlü," in message.get_content()
    assert RLO not in message.raw.decode("utf-8")


def test_server_without_smtputf8_gets_the_idna_domain(
    redis_server: RedisServer, ascii_sink: SmtpSink, mongodb_uri: str, db: Database
) -> None:
    mail_from = "Chängeflow <no-reply@chängeflow.test>"
    with worker_for(redis_server, ascii_sink, mongodb_uri, db, MAIL_FROM=mail_from):
        event = user_insert({"_id": ObjectId(), "email": "jorg@exämple.test", "name": f"{LRI}Jörg{PDI}"})
        assert run(send_welcome_email, event).state == "SUCCESS"

    [message] = ascii_sink.wait_for(1)
    assert message.envelope_rcpt == ["jorg@xn--exmple-cua.test"]
    assert message.envelope_from == "no-reply@xn--chngeflow-w2a.test"
    assert "SMTPUTF8" not in message.mail_options
    head = message.raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()  # a server without SMTPUTF8 gets ASCII headers (RFC 2047 display names)
    [to] = message["To"].addresses
    assert (to.addr_spec, to.display_name) == ("jorg@xn--exmple-cua.test", "Jörg")
    assert message["From"].addresses[0].display_name == "Chängeflow"


def test_server_without_smtputf8_non_ascii_local_part_is_a_dead_letter(
    redis_server: RedisServer, ascii_sink: SmtpSink, mongodb_uri: str, db: Database
) -> None:
    with worker_for(redis_server, ascii_sink, mongodb_uri, db):
        event = user_insert({"_id": ObjectId(), "email": "jörg@exämple.test", "name": "Jörg"})
        key = dedup_key(event["_id"], "tasks.send_welcome_email")
        assert run(send_welcome_email, event).state == "FAILURE"
        assert not get_dedup_store().is_done(key)  # replayable once the server offers SMTPUTF8

    letter = db.changeflow_dead_letters.find_one({"_id": key})
    assert letter is not None
    assert (letter["reason"], letter["attempts"]) == ("permanent", 1)
    assert "PermanentTaskError" in letter["error"]
    assert "does not offer SMTPUTF8" in letter["error"]
    assert "'jörg' is not ASCII" in letter["error"]
    assert "UnicodeEncodeError" not in letter["error"]
    assert ascii_sink.messages == []

    # The same task against a server that offers SMTPUTF8 (the replay after fixing the server).
    with SmtpSink(smtputf8=True) as utf8_sink:
        with worker_for(redis_server, utf8_sink, mongodb_uri, db):
            assert run(send_welcome_email, event).state == "SUCCESS"
        assert utf8_sink.wait_for(1)[0].envelope_rcpt == ["jörg@exämple.test"]


@pytest.mark.parametrize("smtputf8", [True, False])
def test_shipping_subject_from_user_data_loses_bidi_controls(
    redis_server: RedisServer, mongodb_uri: str, db: Database, smtputf8: bool
) -> None:
    user = {"_id": ObjectId(), "email": "buyer@exämple.test", "name": f"B{RLO}uyer"}
    order = {"_id": f"A-{RLO}1001", "user_id": user["_id"], "status": "paid"}
    db.users.insert_one(user)
    db.orders.insert_one(order)
    with SmtpSink(smtputf8=smtputf8) as sink:
        with worker_for(redis_server, sink, mongodb_uri, db):
            assert run(send_shipping_notification, order_update(order, {"status": "shipped"})).successful()
        [message] = sink.wait_for(1)
    assert message["Subject"] == "Your order A-1001 has shipped"
    assert message["To"].addresses[0].display_name == "Buyer"
    expected = "buyer@exämple.test" if smtputf8 else "buyer@xn--exmple-cua.test"
    assert message.envelope_rcpt == [expected]
    assert "your order A-1001 has shipped." in message.get_content()
