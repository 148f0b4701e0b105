"""A real local SMTP server that keeps what it receives: for tests, the demo and benchmarks.

    with SmtpSink() as sink:                      # a free port on 127.0.0.1
        ... send mail to sink.host:sink.port ...
        sink.wait_for(1, timeout=5)
        assert sink.count_by_message_id() == {"<key@changeflow>": 1}

The sink offers SMTPUTF8 (RFC 6531: internationalized addresses such as `jörg@exämple.test`) like
current mail servers do; `SmtpSink(smtputf8=False)` / `--no-smtputf8` is one that does not.
`SmtpSink(delay_seconds=0.1)` / `--delay-ms 100` answers each message that much later (a slow mail
server: the pools benchmark); sessions wait concurrently, as on a real server.

`python -m harness.smtp_sink --port N` runs one in the foreground: it prints
`ready smtp://127.0.0.1:PORT` once listening, then one line per received message.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser, Parser
from types import FrameType, TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from harness.ports import free_port


class ReceivedMessage(EmailMessage):
    """A parsed message plus its SMTP envelope (which the headers need not match) and raw bytes."""

    envelope_from: str = ""
    envelope_rcpt: list[str]
    mail_options: list[str]
    raw: bytes = b""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.envelope_rcpt = []
        self.mail_options = []


def _parse(content: bytes) -> ReceivedMessage:
    message = BytesParser(_class=ReceivedMessage, policy=policy.default).parsebytes(content)
    assert isinstance(message, ReceivedMessage)
    head = content.split(b"\r\n\r\n", 1)[0]
    if not head.isascii():
        # UTF-8 header fields (RFC 6532, sent with SMTPUTF8): the bytes parser leaves them as
        # undecodable bytes inside structured headers (`addresses`), so parse the head as text.
        text = Parser(policy=policy.default).parsestr(
            head.decode("utf-8", "surrogateescape"), headersonly=True
        )
        for name in dict.fromkeys(message.keys()):
            del message[name]
        for name, value in text.items():
            message[name] = value
    return message


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.delay_seconds > 0:
            await asyncio.sleep(self.sink.delay_seconds)  # other sessions go on meanwhile
        return self.sink._receive(envelope)


class SmtpSink:
    """An aiosmtpd server in a background thread; `messages` is what it accepted, in order."""

    def __init__(
        self, port: int = 0, host: str = "127.0.0.1", *, smtputf8: bool = True, delay_seconds: float = 0.0
    ) -> None:
        if delay_seconds < 0:
            raise ValueError(f"delay_seconds must be >= 0, got {delay_seconds}")
        self.delay_seconds = delay_seconds
        self.host = host
        self.port = port or free_port()
        self.on_message: Callable[[ReceivedMessage], None] | None = None
        self._messages: list[ReceivedMessage] = []
        self._changed = threading.Condition()
        self._failures: list[str] = []
        self.smtputf8 = smtputf8
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> SmtpSink:
        """Listen (again, after stop(): same port, the messages received so far are kept)."""
        handler = _Handler(self)
        self._controller = Controller(
            handler, hostname=self.host, port=self.port, ready_timeout=10, enable_SMTPUTF8=self.smtputf8
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused (an SMTP outage) until start()."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()

    def _receive(self, envelope: Envelope) -> str:
        with self._changed:
            if self._failures:
                return self._failures.pop(0)  # an injected fault: the message is not kept
        content = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        message = _parse(content)
        message.envelope_from = envelope.mail_from or ""
        message.envelope_rcpt = list(envelope.rcpt_tos)
        message.mail_options = list(envelope.mail_options)
        message.raw = content
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()
        if self.on_message is not None:
            self.on_message(message)
        return "250 OK"

    def fail_next(self, count: int = 1, reply: str = "451 4.3.0 try again later") -> None:
        """Answer the next `count` messages with `reply` instead of accepting them (fault injection)."""
        with self._changed:
            self._failures.extend([reply] * count)

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of the accepted messages."""
        with self._changed:
            return list(self._messages)

    def clear(self) -> None:
        with self._changed:
            self._messages.clear()

    def count_by_message_id(self) -> Counter[str]:
        """How many times each Message-ID arrived (a duplicate shows as a count above 1)."""
        return Counter(str(m.get("Message-ID", "")) for m in self.messages)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least `n` messages arrived; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._messages) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self._messages)} of {n} messages arrived within {timeout}s")
                self._changed.wait(remaining)
            return list(self._messages)


def _print_message(message: ReceivedMessage) -> None:
    print(
        f"to={','.join(message.envelope_rcpt)} subject={message.get('Subject', '')!r} "
        f"message-id={message.get('Message-ID', '')}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.smtp_sink", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--no-smtputf8", dest="smtputf8", action="store_false", help="do not offer SMTPUTF8 (RFC 6531)"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="answer each message this many ms later (a slow server)"
    )
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with SmtpSink(
        port=args.port, host=args.host, smtputf8=args.smtputf8, delay_seconds=args.delay_ms / 1000
    ) as sink:
        sink.on_message = _print_message
        print(f"ready {sink.url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
