"""Building the emails (pure) and the SMTP sink that receives them."""

from __future__ import annotations

import smtplib

import pytest
from bson import Decimal128, ObjectId

from harness.smtp_sink import SmtpSink
from tasks.email import message_id, new_status, shipping_email, valid_email, welcome_email
from worker.errors import PermanentTaskError

KEY = "1b4e28ba-2fa1-51d2-883f-0016d3cca427"
FROM = "changeflow <no-reply@changeflow.local>"
USER = {"_id": ObjectId(), "email": "ada@example.com", "name": "Ada Lovelace"}


def test_welcome_email_headers_and_body() -> None:
    message = welcome_email(USER, key=KEY, mail_from=FROM)
    assert message["To"] == "Ada Lovelace <ada@example.com>"
    assert message["From"] == FROM
    assert message["Message-ID"] == f"<{KEY}@changeflow>" == message_id(KEY)
    assert message["Subject"] == "Welcome to changeflow"
    assert message["Date"]
    assert "Hello Ada Lovelace" in message.get_content()


def test_same_key_same_message_id() -> None:
    first = welcome_email(USER, key=KEY, mail_from=FROM)
    second = welcome_email({**USER, "name": "Renamed"}, key=KEY, mail_from=FROM)
    assert first["Message-ID"] == second["Message-ID"]


@pytest.mark.parametrize(
    "email",
    [None, "", "not-an-address", "a@b", "two@@example.com", "a b@example.com", "x@ex.com\nBcc: y@z.com", 5],
)
def test_user_without_a_valid_email_is_permanent(email: object) -> None:
    with pytest.raises(PermanentTaskError, match="no valid email"):
        welcome_email({**USER, "email": email}, key=KEY, mail_from=FROM)


def test_user_without_email_field_is_permanent() -> None:
    with pytest.raises(PermanentTaskError):
        welcome_email({"_id": 1, "name": "x"}, key=KEY, mail_from=FROM)
    assert valid_email(" ok@example.com ") == "ok@example.com"


def test_name_with_newlines_cannot_inject_headers() -> None:
    message = welcome_email({**USER, "name": "Eve\r\nBcc: victim@example.com"}, key=KEY, mail_from=FROM)
    assert message["Bcc"] is None
    assert message["To"].addresses[0].addr_spec == "ada@example.com"


@pytest.mark.parametrize(
    ("status", "verb"), [("shipped", "has shipped"), ("delivered", "has been delivered")]
)
def test_shipping_email(status: str, verb: str) -> None:
    order = {"_id": 1001, "user_id": USER["_id"], "status": status, "total": Decimal128("19.9")}
    message = shipping_email(USER, order, status, key=KEY, mail_from=FROM)
    assert message["Subject"] == f"Your order 1001 {verb}"
    assert message["Message-ID"] == f"<{KEY}@changeflow>"
    assert "Order total: 19.90" in message.get_content()


def test_shipping_email_refuses_other_statuses() -> None:
    with pytest.raises(ValueError, match="no notification"):
        shipping_email(USER, {"_id": 1}, "cancelled", key=KEY, mail_from=FROM)


def test_new_status_comes_from_updated_fields_only() -> None:
    update = {
        "operationType": "update",
        "updateDescription": {"updatedFields": {"status": "shipped"}},
        "fullDocument": {"status": "delivered"},  # a later post-image: not this event's change
    }
    assert new_status(update) == "shipped"
    assert (
        new_status({"operationType": "update", "updateDescription": {"updatedFields": {"total": 1}}}) is None
    )
    assert new_status({"operationType": "insert", "fullDocument": {"status": "shipped"}}) is None


def test_smtp_sink_receives_parses_and_counts() -> None:
    with SmtpSink() as sink:
        message = welcome_email(USER, key=KEY, mail_from=FROM)
        with smtplib.SMTP(sink.host, sink.port, timeout=5) as smtp:
            smtp.send_message(message)
            smtp.send_message(message)
        received = sink.wait_for(2, timeout=5)
    assert received[0]["Subject"] == "Welcome to changeflow"
    assert received[0].envelope_rcpt == ["ada@example.com"]
    assert received[0].envelope_from == "no-reply@changeflow.local"
    assert sink.count_by_message_id() == {f"<{KEY}@changeflow>": 2}


def test_smtp_sink_fault_injection_and_timeout() -> None:
    with SmtpSink() as sink:
        sink.fail_next(1)
        message = welcome_email(USER, key=KEY, mail_from=FROM)
        with smtplib.SMTP(sink.host, sink.port, timeout=5) as smtp:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.send_message(message)
            assert refused.value.smtp_code == 451
            smtp.send_message(message)
        assert len(sink.wait_for(1, timeout=5)) == 1
        with pytest.raises(TimeoutError, match="1 of 2"):
            sink.wait_for(2, timeout=0.2)
