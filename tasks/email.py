"""Emails: a welcome mail for each new user, a notification when an order ships or is delivered.

Building a message is pure (`welcome_email`, `shipping_email`); sending is plain smtplib. The
Message-ID is derived from the dedup key, so the one duplicate the guard cannot prevent (a worker
dying after the SMTP server accepted the mail, before the key was marked done) carries the same
Message-ID as the original and the receiving side can drop it.

Internationalized addresses (`jörg@exämple.test`, RFC 6531) go out as they are when the server
offers SMTPUTF8 (smtplib's send_message then uses it). Without it, a domain is sent in its IDNA
form (`jorg@xn--exmple-cua.test`, the same mailbox); a non-ASCII local part has no ASCII form, so
that mail is a dead letter saying so. Text from user data (display names, order ids in subjects)
loses bidi control characters, which could make a mail client show it in another order.
"""

from __future__ import annotations

import contextlib
import copy
import re
import smtplib
import unicodedata
from collections.abc import Iterator, Mapping
from decimal import Decimal
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import idna
from bson import Decimal128

from changeflow import FieldChanged, tracing
from changeflow.worker.errors import PermanentTaskError, Skip, TransientTaskError
from changeflow.worker.idempotent import current_key
from changeflow.worker.mongo import get_db
from changeflow.worker.settings import get_settings
from tasks.app import app

NOTIFIED_STATUSES = frozenset({"shipped", "delivered"})
SMTP_TIMEOUT_SECONDS = 20
# Deliberately simple: the mail server has the last word; this only stops what is surely wrong
# (and anything with CR/LF, which could inject headers).
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
# Unicode's bidirectional formatting characters: the embeddings and overrides (U+202A-U+202E), the
# isolates (U+2066-U+2069) and the invisible marks (LRM, RLM, ALM). One RLO in a name turns
# "Ada\u202egnp.exe" into what a mail client shows as "Adaexe.png"; none belongs in a header.
BIDI_CONTROLS = frozenset(
    chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)
)
_DROP = dict.fromkeys(map(ord, BIDI_CONTROLS))


def message_id(key: str) -> str:
    return f"<{key}@changeflow>"


def clean_text(value: str) -> str:
    """`value` fit for a header: one line, bidi controls and other control characters removed."""
    text = " ".join(value.translate(_DROP).split())  # split() also takes CR/LF: no header injection
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cc")


def valid_email(value: object) -> str:
    """The address, or PermanentTaskError when it is missing or not an address."""
    if (
        not isinstance(value, str)
        or not _EMAIL.fullmatch(value.strip())
        or any(ch in BIDI_CONTROLS or unicodedata.category(ch) == "Cc" for ch in value)
    ):
        raise PermanentTaskError(f"no valid email address: {value!r}")
    return value.strip()


def ascii_address(address: str) -> str:
    """`address` as a server without SMTPUTF8 can take it: the domain in IDNA form (A-labels).

    PermanentTaskError when that cannot be: a non-ASCII local part has no ASCII equivalent (only
    the receiving server knows what it means), or the domain is not a valid internationalized name.
    """
    if address.isascii():
        return address
    local, _, domain = address.rpartition("@")
    if not local.isascii():
        raise PermanentTaskError(
            f"cannot send to {address!r}: the mail server does not offer SMTPUTF8, and the local part "
            f"{local!r} is not ASCII (it has no ASCII form; only an SMTPUTF8 server can take it)"
        )
    try:
        ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise PermanentTaskError(
            f"cannot send to {address!r}: the mail server does not offer SMTPUTF8, and the domain "
            f"{domain!r} has no IDNA form ({exc})"
        ) from exc
    return f"{local}@{ascii_domain}"


def without_smtputf8(message: EmailMessage) -> EmailMessage:
    """`message` with every address in ASCII (`ascii_address`), for a server without SMTPUTF8.

    The same message when all addresses already are; PermanentTaskError when one cannot be.
    """
    if all(_ascii_addresses(value) for value in message.values()):
        return message
    downgraded = copy.deepcopy(message)
    items = downgraded.items()
    for name in dict.fromkeys(downgraded.keys()):
        del downgraded[name]
    for name, value in items:  # in their order
        if _ascii_addresses(value):
            downgraded[name] = value
        else:
            downgraded[name] = [
                _mailbox(a.display_name, ascii_address(f"{a.username}@{a.domain}")) for a in value.addresses
            ]
    return downgraded


def _ascii_addresses(header: object) -> bool:
    addresses: tuple[Address, ...] = getattr(header, "addresses", ())  # address headers only
    return all(a.addr_spec.isascii() for a in addresses)


def _mailbox(display_name: str, address: str) -> Address:
    # username/domain rather than addr_spec: Address refuses to parse a non-ASCII local part, and
    # formataddr refuses any non-ASCII address. Both are legal under SMTPUTF8.
    local, _, domain = address.rpartition("@")
    return Address(display_name=display_name, username=local, domain=domain)


def _display_name(user: Mapping[str, Any]) -> str:
    name = user.get("name")
    return clean_text(name) if isinstance(name, str) else ""


def _base_message(user: Mapping[str, Any], *, key: str, mail_from: str, subject: str) -> EmailMessage:
    address = valid_email(user.get("email"))
    message = EmailMessage()
    message["From"] = mail_from
    message["To"] = _mailbox(_display_name(user), address)
    message["Subject"] = clean_text(subject)
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id(key)
    return message


def welcome_email(user: Mapping[str, Any], *, key: str, mail_from: str) -> EmailMessage:
    """The welcome mail for a new user document `{_id, email, name, ...}`."""
    name = _display_name(user)
    message = _base_message(user, key=key, mail_from=mail_from, subject="Welcome to changeflow")
    message.set_content(
        f"Hello {name or 'there'},\n\nwelcome aboard! Your account is ready.\n\n-- changeflow\n"
    )
    return message


def _money(total: object) -> str:
    if isinstance(total, Decimal128):
        total = total.to_decimal()
    if isinstance(total, Decimal | int | float):
        return f"{Decimal(str(total)):.2f}"
    return str(total)


def shipping_email(
    user: Mapping[str, Any], order: Mapping[str, Any], status: str, *, key: str, mail_from: str
) -> EmailMessage:
    """The notification that `order` is now `status` ("shipped" or "delivered")."""
    if status not in NOTIFIED_STATUSES:
        raise ValueError(f"no notification for status {status!r}")
    order_id = clean_text(str(order.get("_id")))
    verb = "has shipped" if status == "shipped" else "has been delivered"
    message = _base_message(user, key=key, mail_from=mail_from, subject=f"Your order {order_id} {verb}")
    lines = [f"Hello {_display_name(user) or 'there'},", "", f"your order {order_id} {verb}."]
    if order.get("total") is not None:
        lines.append(f"Order total: {_money(order['total'])}")
    message.set_content("\n".join([*lines, "", "-- changeflow", ""]))
    return message


def new_status(event: Mapping[str, Any]) -> str | None:
    """The status an update event sets (from updatedFields: fullDocument may be a later post-image)."""
    if event.get("operationType") != "update":
        return None
    status = ((event.get("updateDescription") or {}).get("updatedFields") or {}).get("status")
    return status if isinstance(status, str) else None


@contextlib.contextmanager
def smtp_session(host: str, port: int) -> Iterator[smtplib.SMTP]:
    """A connection to the mail server: QUIT after a conversation that went through, as smtplib's own
    `with` does; after one broken off midway (an error, or gevent's hard time limit interrupting a
    wait), closed without QUIT. The server's next reply may answer an earlier command (a late 250 to
    DATA): smtplib's QUIT would read it as its own and raise in place of what broke the conversation.
    """
    smtp = smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT_SECONDS)
    try:
        yield smtp
    except BaseException:
        smtp.close()
        raise
    with smtp:  # QUIT (an unexpected reply to it raises, as before)
        pass


def send(message: EmailMessage) -> None:
    """Hand `message` to SMTP_HOST:SMTP_PORT; 4xx replies are transient, 5xx permanent.

    Non-ASCII addresses need the server's SMTPUTF8, or else their ASCII form (`without_smtputf8`).
    """
    settings = get_settings()
    try:
        with (
            tracing.span(
                "smtp.send", **{"server.address": settings.smtp_host, "server.port": settings.smtp_port}
            ),
            smtp_session(settings.smtp_host, settings.smtp_port) as smtp,
        ):
            smtp.ehlo_or_helo_if_needed()
            if not smtp.has_extn("smtputf8"):
                message = without_smtputf8(message)
            smtp.send_message(message)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        if all(400 <= code < 500 for code in codes):
            raise TransientTaskError(f"recipients temporarily refused: {exc.recipients}") from exc
        raise PermanentTaskError(f"recipients refused: {exc.recipients}") from exc
    except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected):
        raise  # transient, retried by the guard
    except smtplib.SMTPResponseException as exc:
        if 400 <= exc.smtp_code < 500:
            raise TransientTaskError(f"SMTP {exc.smtp_code}: {exc.smtp_error!r}") from exc
        raise PermanentTaskError(f"SMTP {exc.smtp_code}: {exc.smtp_error!r}") from exc


def _full_document(event: Mapping[str, Any]) -> Mapping[str, Any]:
    document = event.get("fullDocument")
    if not isinstance(document, Mapping):
        raise PermanentTaskError(f"event {event.get('_id')!r} has no fullDocument")
    return document


@app.on("users", "insert", name="tasks.send_welcome_email")
def send_welcome_email(event: dict[str, Any]) -> None:
    """Welcome the user a users insert created."""
    user = _full_document(event)
    send(welcome_email(user, key=current_key(), mail_from=get_settings().mail_from))


# ordered_by=True: one order's notifications run one at a time in commit order ("shipped" before
# "delivered"), different orders in parallel (docs/ordering.md).
@app.on(
    "orders", "update", when=FieldChanged("status"), name="tasks.send_shipping_notification", ordered_by=True
)
def send_shipping_notification(event: dict[str, Any]) -> None:
    """Tell the order's user it shipped / was delivered; other status changes send nothing."""
    status = new_status(event)
    if status not in NOTIFIED_STATUSES:
        raise Skip(f"order status {status!r} sends no notification")
    db = get_db()
    order: Mapping[str, Any] | None = event.get("fullDocument")
    if not isinstance(order, Mapping) or "user_id" not in order:
        # No post-image in the event: read the order (its user_id does not change).
        order = db.orders.find_one({"_id": event["documentKey"]["_id"]})
        if order is None:
            raise PermanentTaskError(f"order {event['documentKey']['_id']!r} no longer exists")
    user_id = order.get("user_id")
    user = db.users.find_one({"_id": user_id})
    if user is None:
        raise PermanentTaskError(f"order {order.get('_id')!r} points at missing user {user_id!r}")
    send(shipping_email(user, order, status, key=current_key(), mail_from=get_settings().mail_from))
