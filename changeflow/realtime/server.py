"""The realtime gateway: a python-socketio AsyncServer (ASGI, on uvicorn) for browsers and apps.

    client --connect, auth: {token}--> gateway: token checked (tokens.py), else ConnectionRefusedError
                                       accepted: the client joins room user:<its user id>, and only it
    task --emit--> Redis channel --> every gateway (AsyncRedisManager) --> the room's clients

Any number of gateways can run: each subscribes to REALTIME_CHANNEL and delivers the emits to its own
clients. HTTP besides Socket.IO (default path /socket.io/): `/` the page (static/), `/health` (200
while subscribed to the channel, else 503), and,
with REALTIME_DEMO=1 only, the demo sign-in `/demo/users` and `/demo/login`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import socketio
import uvicorn

from changeflow.realtime.messages import user_room
from changeflow.realtime.tokens import MAX_USER_ID_LENGTH, InvalidToken, make_token, read_token, token_of
from changeflow.worker.redis_conn import RedisTarget
from changeflow.worker.settings import Settings, mask_url

log = logging.getLogger("changeflow.realtime")

STATIC = Path(__file__).resolve().parent / "static"
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/socket.io.min.js": ("socket.io.min.js", "text/javascript; charset=utf-8"),
}
DEMO_USERS_SHOWN = 50

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class GatewayManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    """socketio.AsyncRedisManager connected through changeflow's Redis URL reading (TLS, Sentinel),
    with `subscribed` set once it listens on the channel (the gateway is ready only then)."""

    def __init__(self, target: RedisTarget, url: str, channel: str) -> None:
        super().__init__(url=mask_url(url), channel=channel, logger=log)
        self._target = target
        self.subscribed = asyncio.Event()

    def _redis_connect(self) -> None:
        self.redis = self._target.async_client(socket_connect_timeout=10)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.connected = True

    async def _redis_listen_with_retries(self) -> Any:
        delay = 1.0
        while True:
            try:
                self._redis_connect()
                await self.pubsub.subscribe(self.channel)
                self.subscribed.set()
                delay = 1.0
                async for message in self.pubsub.listen():
                    yield message
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                log.error(
                    "Redis %s: cannot receive on channel %s (%s: %s); retrying in %.0fs",
                    self.redis_url, self.channel, type(exc).__name__, exc, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)


@dataclass
class Gateway:
    sio: socketio.AsyncServer
    manager: GatewayManager
    app: socketio.ASGIApp


def create_gateway(
    settings: Settings, *, demo_users: Callable[[], list[dict[str, str]]] | None = None
) -> Gateway:
    """The Socket.IO server, its Redis manager and the ASGI app serving both and the page.

    The caller has checked REALTIME_SECRET (settings.realtime_secret_problems). `demo_users` lists
    the users the demo sign-in offers (default: the `users` collection of MONGODB_DB).
    """
    secret, ttl = settings.realtime_secret, settings.realtime_token_ttl
    manager = GatewayManager(
        settings.redis_target("realtime_redis_url"), settings.realtime_redis_url, settings.realtime_channel
    )
    # cors_allowed_origins left at its default: browsers may connect from this gateway's own origin.
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, logger=False, engineio_logger=False)

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        try:
            user_id = read_token(token_of(auth), secret, ttl)
        except InvalidToken as exc:
            log.info("refused a connection from %s: %s", _peer(environ), exc)
            # python-socketio's ConnectionRefusedError tells the client why (the builtin's: a generic text).
            raise socketio.exceptions.ConnectionRefusedError(str(exc)) from None
        await sio.enter_room(sid, user_room(user_id))
        log.info("user %s connected (%s)", user_id, sid)

    @sio.event
    async def disconnect(sid: str, *_: Any) -> None:
        log.debug("%s disconnected", sid)

    async def start() -> None:
        # Subscribe now, not at the first client's connect (python-socketio's default), so emits
        # published once the gateway says it is ready reach clients that connect afterwards.
        if not sio.manager_initialized:
            sio.manager_initialized = True
            manager.initialize()

    users = demo_users or _users_from_mongodb
    http = _http_app(settings, users, manager.subscribed.is_set)
    static = {
        path: {"filename": str(STATIC / name), "content_type": kind}
        for path, (name, kind) in PAGE_FILES.items()
    }
    app = socketio.ASGIApp(sio, other_asgi_app=http, static_files=static, on_startup=start)
    return Gateway(sio=sio, manager=manager, app=app)


def _peer(environ: dict[str, Any]) -> str:
    scope = environ.get("asgi.scope") or {}
    client = scope.get("client") if isinstance(scope, dict) else None
    return f"{client[0]}:{client[1]}" if client else str(environ.get("REMOTE_ADDR", "?"))


def _users_from_mongodb() -> list[dict[str, str]]:
    from changeflow.worker.mongo import get_db

    found = get_db().users.find({}, {"name": 1}).sort("_id", 1).limit(DEMO_USERS_SHOWN)
    return [{"id": str(u["_id"]), "name": str(u.get("name") or u["_id"])} for u in found]


def _http_app(
    settings: Settings, demo_users: Callable[[], list[dict[str, str]]], subscribed: Callable[[], bool]
) -> Callable[..., Awaitable[None]]:
    """The gateway's HTTP endpoints other than the page and Socket.IO."""
    demo = settings.realtime_demo == 1

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/health" and method == "GET":
            # Unhealthy while not subscribed to the channel (Redis away): emits would not arrive.
            if subscribed():
                return await _reply(send, 200, {"status": "ok"})
            return await _reply(send, 503, {"status": "not subscribed to Redis"})
        if demo and path == "/demo/users" and method == "GET":
            try:
                users = await asyncio.to_thread(demo_users)
            except Exception as exc:
                log.warning("demo sign-in: cannot list users (%s: %s)", type(exc).__name__, exc)
                return await _reply(send, 503, {"error": "cannot list the users"})
            return await _reply(send, 200, {"users": users})
        if demo and path == "/demo/login" and method == "POST":
            body = await _body(receive)
            try:
                user_id = json.loads(body).get("user_id")
            except (ValueError, AttributeError):
                user_id = None
            if not isinstance(user_id, str) or not user_id.strip() or len(user_id) > MAX_USER_ID_LENGTH:
                return await _reply(send, 400, {"error": "user_id must be a non-empty string"})
            user_id = user_id.strip()
            log.info("demo sign-in as user %s", user_id)
            return await _reply(
                send, 200, {"user_id": user_id, "token": make_token(user_id, settings.realtime_secret)}
            )
        return await _reply(send, 404, {"error": "not found"})

    return app


async def _body(receive: Receive, limit: int = 64 * 1024) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body") or len(body) > limit:
            return body[:limit]


async def _reply(send: Send, status: int, document: Any) -> None:
    body = json.dumps(document).encode()
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve(settings: Settings, *, on_ready: Callable[[str], None] | None = None) -> int:
    """Run the gateway until SIGINT/SIGTERM; 0 when stopped, 1 when it could not listen."""
    gateway = create_gateway(settings)
    config = uvicorn.Config(
        gateway.app,
        host=settings.realtime_host,
        port=settings.realtime_port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    running = asyncio.create_task(server.serve())
    while not server.started and not running.done():
        await asyncio.sleep(0.05)
    if running.done():
        log.error(
            "the realtime gateway could not listen on %s:%s", settings.realtime_host, settings.realtime_port
        )
        return 1
    subscribed = asyncio.create_task(gateway.manager.subscribed.wait())
    await asyncio.wait({running, subscribed}, return_when=asyncio.FIRST_COMPLETED)
    if subscribed.done():
        port = server.servers[0].sockets[0].getsockname()[1]
        address = f"http://{_url_host(settings.realtime_host)}:{port}"
        log.info(
            "realtime gateway ready on %s (Redis %s, channel %s, demo sign-in %s)",
            address, mask_url(settings.realtime_redis_url), settings.realtime_channel,
            "ON: do not expose this gateway" if settings.realtime_demo else "off",
        )  # fmt: skip
        if on_ready is not None:
            on_ready(address)
    else:
        subscribed.cancel()
    await running
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
