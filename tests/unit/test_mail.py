"""Building the emails (pure) and the SMTP sink that receives them."""

from __future__ import annotations

import smtplib

import pytest
from bson import Decimal128, ObjectId

from changeflow.worker.errors import PermanentTaskError
from harness.smtp_sink import SmtpSink
from tasks.email import (
    BIDI_CONTROLS,
    ascii_address,
    clean_text,
    message_id,
    new_status,
    shipping_email,
    smtp_session,
    valid_email,
    welcome_email,
    without_smtputf8,
)

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


# --- internationalized addresses and bidi controls ----------------------------------------------

BIDI = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)]


@pytest.mark.parametrize("control", BIDI, ids=[f"U+{ord(c):04X}" for c in BIDI])
def test_bidi_controls_leave_names_and_subjects(control: str) -> None:
    assert control in BIDI_CONTROLS
    name = f"Ada{control}gnp.exe"
    order = {"_id": f"A{control}1", "user_id": 1, "status": "shipped"}
    message = shipping_email({**USER, "name": name}, order, "shipped", key=KEY, mail_from=FROM)
    assert message["To"].addresses[0].display_name == "Adagnp.exe"
    assert message["Subject"] == "Your order A1 has shipped"
    assert control not in message.get_content()
    assert "Hello Adagnp.exe," in message.get_content()


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("Jörg  Ünlü", "Jörg Ünlü"),
        ("\u202b\u05e2\u05d1\u05e8\u05d9\u05ea\u202c name", "\u05e2\u05d1\u05e8\u05d9\u05ea name"),
        ("a\r\nBcc: b\x00\x7f", "a Bcc: b"),
        ("\u2067\u2069", ""),
        ("zero\u200dwidth joiner stays", "zero\u200dwidth joiner stays"),  # needed by some scripts
    ],
)
def test_clean_text(text: str, clean: str) -> None:
    assert clean_text(text) == clean
    assert clean_text(clean) == clean


@pytest.mark.parametrize("email", ["jörg@exämple.test", "δοκιμή@παράδειγμα.δοκιμή", "jorg@exämple.test"])
def test_internationalized_address_is_kept_exactly(email: str) -> None:
    message = welcome_email({**USER, "email": email, "name": "Jörg"}, key=KEY, mail_from=FROM)
    [to] = message["To"].addresses
    assert (to.addr_spec, to.display_name) == (email, "Jörg")
    assert valid_email(email) == email


@pytest.mark.parametrize("email", ["jörg\u202e@exämple.test", "ada@exam\u2066ple.com", "a\x00b@example.com"])
def test_address_with_control_characters_is_permanent(email: str) -> None:
    with pytest.raises(PermanentTaskError, match="no valid email"):
        valid_email(email)


@pytest.mark.parametrize(
    ("address", "ascii_form"),
    [
        ("ada@example.com", "ada@example.com"),
        ("jorg@exämple.test", "jorg@xn--exmple-cua.test"),
        ("jorg@EXÄMPLE.test", "jorg@xn--exmple-cua.test"),  # UTS 46 mapping, as browsers and MTAs do
        ("x@faß.de", "x@xn--fa-hia.de"),  # IDNA 2008 (IDNA 2003 would map ß to ss: another domain)
    ],
)
def test_ascii_address_encodes_the_domain(address: str, ascii_form: str) -> None:
    assert ascii_address(address) == ascii_form


def test_ascii_address_refuses_a_non_ascii_local_part_saying_why() -> None:
    with pytest.raises(PermanentTaskError) as refused:
        ascii_address("jörg@exämple.test")
    assert "does not offer SMTPUTF8" in str(refused.value)
    assert "local part 'jörg' is not ASCII" in str(refused.value)


def test_ascii_address_refuses_a_domain_without_idna_form() -> None:
    with pytest.raises(PermanentTaskError, match="has no IDNA form"):
        ascii_address("ada@☃️.example")


def test_without_smtputf8_rewrites_every_address_header_in_place() -> None:
    mail_from = "Chängeflow <no-reply@chängeflow.test>"
    message = welcome_email(
        {**USER, "email": "jorg@exämple.test", "name": "Jörg"}, key=KEY, mail_from=mail_from
    )
    message["Reply-To"] = "Support <hilfe@exämple.test>"

    ascii_message = without_smtputf8(message)

    assert [str(a) for a in ascii_message["From"].addresses] == [
        "Chängeflow <no-reply@xn--chngeflow-w2a.test>"
    ]
    assert [str(a) for a in ascii_message["To"].addresses] == ["Jörg <jorg@xn--exmple-cua.test>"]
    assert ascii_message["Reply-To"].addresses[0].addr_spec == "hilfe@xn--exmple-cua.test"
    assert ascii_message.keys() == message.keys()  # same headers, same order
    assert ascii_message.get_content() == message.get_content()
    assert ascii_message["Message-ID"] == message["Message-ID"]
    assert message["To"].addresses[0].addr_spec == "jorg@exämple.test"  # the original is untouched
    assert ascii_message.as_bytes().split(b"\n\n", 1)[0].isascii()


def test_without_smtputf8_leaves_ascii_messages_alone_and_refuses_what_it_cannot_encode() -> None:
    message = welcome_email({**USER, "name": "Jörg"}, key=KEY, mail_from=FROM)
    assert without_smtputf8(message) is message
    international = welcome_email({**USER, "email": "jörg@exämple.test"}, key=KEY, mail_from=FROM)
    with pytest.raises(PermanentTaskError, match="'jörg' is not ASCII"):
        without_smtputf8(international)


def test_smtp_sink_decodes_utf8_headers() -> None:
    message = welcome_email({**USER, "email": "jörg@exämple.test", "name": "Jörg"}, key=KEY, mail_from=FROM)
    with SmtpSink(smtputf8=True) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=5) as smtp:
            smtp.send_message(message)
        [received] = sink.wait_for(1, timeout=5)
    assert received["To"].addresses[0].addr_spec == "jörg@exämple.test"
    assert received.envelope_rcpt == ["jörg@exämple.test"]
    assert "SMTPUTF8" in received.mail_options


def test_smtp_sink_without_smtputf8_refuses_utf8_addresses() -> None:
    message = welcome_email({**USER, "email": "jörg@exämple.test"}, key=KEY, mail_from=FROM)
    with SmtpSink(smtputf8=False) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=5) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("smtputf8")
            with pytest.raises(smtplib.SMTPNotSupportedError):
                smtp.send_message(message)
        assert sink.messages == []


class _Interrupted(BaseException):
    """What gevent's hard time limit raises inside a wait (a BaseException, like gevent.Timeout)."""


@pytest.fixture
def smtp_commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The commands smtplib sends through docmd (QUIT among them), in order."""
    sent: list[str] = []
    docmd = smtplib.SMTP.docmd

    def recording(self: smtplib.SMTP, cmd: str, args: str = "") -> tuple[int, bytes]:
        sent.append(cmd.lower())
        return docmd(self, cmd, args)

    monkeypatch.setattr(smtplib.SMTP, "docmd", recording)
    return sent


def test_a_conversation_broken_off_midway_is_closed_without_quit(smtp_commands: list[str]) -> None:
    # A QUIT would read the pending reply of the command before it (250) and raise an
    # SMTPResponseException in place of the interruption.
    with SmtpSink() as sink, pytest.raises(_Interrupted), smtp_session(sink.host, sink.port) as smtp:
        smtp.ehlo()
        smtp.putcmd("noop")  # its reply is never read: the conversation is out of step
        raise _Interrupted
    assert smtp.sock is None and "quit" not in smtp_commands


def test_a_conversation_that_went_through_ends_with_quit(smtp_commands: list[str]) -> None:
    with SmtpSink() as sink, smtp_session(sink.host, sink.port) as smtp:
        smtp.ehlo()
    assert smtp.sock is None and smtp_commands == ["quit"]
