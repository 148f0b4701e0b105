"""The socket server: one thread per connection, and the MongoDouble context manager."""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import socketserver
import threading
from types import TracebackType
from typing import Any

from changeflow.testing.mongo_double import ordering, wire
from changeflow.testing.mongo_double.commands import Connection, Context, dispatch
from changeflow.testing.mongo_double.errors import CloseConnection, MongoError

log = logging.getLogger("mongo_double")

# MongoDB 7.0 answers OP_QUERY only for the handshake; everything else must come as OP_MSG.
LEGACY_COMMANDS = frozenset({"ismaster", "isMaster", "hello"})


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = self.server.ctx
        conn = Connection(next(self.server.conn_ids), f"{self.client_address[0]}:{self.client_address[1]}")
        self.server.track(sock, add=True)
        ctx.connections += 1
        try:
            while True:
                try:
                    request = wire.read_request(sock)
                except (ConnectionError, OSError):
                    return  # the client went away
                except wire.MalformedMessage as exc:
                    log.warning(
                        "closing connection %s from %s: malformed message: %s", conn.conn_id, conn.peer, exc
                    )
                    return
                try:
                    reply = self._run(ctx, conn, request)
                except CloseConnection as exc:
                    log.info("closing connection %s: %s", conn.conn_id, exc)
                    return
                if reply is None:
                    continue
                try:
                    sock.sendall(reply)
                except OSError:
                    return
        finally:
            ctx.connections -= 1
            self.server.track(sock, add=False)

    def _run(self, ctx: Context, conn: Connection, request: wire.Request) -> bytes | None:
        cmd = request.command
        name = next(iter(cmd))
        if request.op_code == wire.OP_QUERY and name not in LEGACY_COMMANDS:
            reply: dict[str, Any] = MongoError(
                352, f"Unsupported OP_QUERY command: {name}. The client driver may require an upgrade."
            ).to_doc()
        else:
            try:
                reply = dispatch(ctx, conn, cmd)
            except CloseConnection:
                raise
            except Exception as exc:  # a bug here must cost one reply, never the server
                log.exception("internal error running %s", name)
                reply = MongoError(
                    1, f"internal error in the MongoDB test server: {type(exc).__name__}: {exc}"
                ).to_doc()
        if request.more_to_come:
            return None  # w:0 / moreToCome: the client expects no answer
        request_id = next(self.server.request_ids)
        try:
            if request.op_code == wire.OP_QUERY:
                return wire.encode_op_reply(request.request_id, request_id, reply)
            return wire.encode_op_msg(request.request_id, request_id, reply, request.compressor)
        except Exception as exc:  # e.g. a reply document over the BSON size limit
            log.exception("cannot encode the reply to %s", name)
            error = MongoError(10334, f"cannot encode reply: {exc}").to_doc()
            return wire.encode_op_msg(request.request_id, request_id, error)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], ctx_args: dict[str, Any]) -> None:
        super().__init__(address, _Handler)
        ordering.install()  # sorting by a Timestamp field, as MongoDB does
        self.ctx = Context(port=self.server_address[1], **ctx_args)
        self.conn_ids = itertools.count(1)
        self.request_ids = itertools.count(1)
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()

    def track(self, sock: socket.socket, add: bool) -> None:
        with self._clients_lock:
            (self._clients.add if add else self._clients.discard)(sock)

    def close_clients(self) -> None:
        with self._clients_lock:
            clients = list(self._clients)
        for sock in clients:
            with contextlib.suppress(OSError):  # already closed by the client
                sock.shutdown(socket.SHUT_RDWR)


class MongoDouble:
    """A MongoDB wire-protocol test server serving from a background thread.

    with MongoDouble(port=0) as server:
        client = MongoClient(server.uri)
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", oplog_size: int = 100_000) -> None:
        advertised = "127.0.0.1" if host in ("", "0.0.0.0") else host
        self._server = _TCPServer((host, port), {"host": advertised, "oplog_size": oplog_size})
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def uri(self) -> str:
        return f"mongodb://{self._server.ctx.host_port}/?replicaSet=rs0"

    def start(self) -> MongoDouble:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"mongo_double:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.1)

    def close(self) -> None:
        """Stop accepting, close client connections, wake waiting change streams."""
        if self._thread is not None:
            self._server.shutdown()
        self._server.ctx.log.close()
        self._server.close_clients()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MongoDouble:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
