"""The console's ASGI app (Starlette): pages rendered with Jinja2 (autoescaped), POSTs for changes."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from changeflow.console import auth
from changeflow.console.csrf import COOKIE, FIELD, CsrfTokens, same_origin
from changeflow.console.filters import parse_filter, selected_ids
from changeflow.console.status import read_status
from changeflow.listener import dead_letters as letters
from changeflow.listener.dead_letters import REASONS, UsageError

if TYPE_CHECKING:
    from celery import Celery
    from pymongo.database import Database

    from changeflow.listener.publish import Publisher
    from changeflow.worker.settings import Settings

log = logging.getLogger("changeflow.console")

HERE = Path(__file__).resolve().parent
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # no-referrer would make browsers send `Origin: null` with the forms (refused by the CSRF check).
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
}


@dataclass
class Console:
    settings: Settings
    db: Database
    app: Celery | None  # the changeflow app replays publish through (None: no replay, tests of pages)
    make_publisher: Callable[[], Publisher] | None = None


def _environment() -> jinja2.Environment:
    from changeflow.listener.dead_letters import _when  # the CLI's time format, one place

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every page, every value
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = _when
    env.filters["first_line"] = letters._first_line
    env.filters["json"] = lambda value: letters.to_json(value, indent=2)
    return env


class BasicAuth:
    """HTTP basic auth on every path but /health; a 401 names the realm, never the expected values."""

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self.app, self.user, self.password = app, user, password

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health" or not self.password:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if auth.authorized(header, self.user, self.password):
            return await self.app(scope, receive, send)
        client = scope.get("client")
        if header:  # the user and password are not logged: only that a try failed, and from where
            log.warning("console: refused credentials from %s", client[0] if client else "?")
        response = PlainTextResponse(
            "401 Unauthorized: the changeflow console needs CONSOLE_USER / CONSOLE_PASSWORD\n",
            status_code=401,
            headers={**auth.challenge(), **SECURITY_HEADERS},
        )
        await response(scope, receive, send)


def create_app(console: Console, *, csrf_key: bytes | None = None) -> ASGIApp:
    settings = console.settings
    templates = _environment()
    tokens = CsrfTokens(csrf_key or secrets.token_bytes(32))
    replay_lock = threading.Lock()  # one replay at a time: a publisher is not shared between threads

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        cookie = request.cookies.get(COOKIE)
        token = tokens.token_of(cookie)
        new_cookie = None
        if token is None:
            token, new_cookie = tokens.new()
        body = templates.get_template(name).render(
            csrf_field=FIELD,
            csrf_token=token,
            flower_url=settings.flower_url,
            stream=settings.listener_stream_name,
            path=request.url.path,
            **context,
        )
        response = HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)
        if new_cookie is not None:
            response.set_cookie(
                COOKIE, new_cookie, httponly=True, samesite="strict", secure=request.url.scheme == "https"
            )
        return response

    async def checked_form(request: Request) -> tuple[Any, Response | None]:
        """The POSTed form, or a 403 page when its CSRF token or Origin is wrong."""
        form = await request.form()
        origin_ok = same_origin(
            request.headers.get("origin"), request.url.scheme, request.headers.get("host")
        )
        submitted = form.get(FIELD)
        token_ok = tokens.valid(
            request.cookies.get(COOKIE), submitted if isinstance(submitted, str) else None
        )
        if origin_ok and token_ok:
            return form, None
        why = "the request came from another site" if not origin_ok else "the form token is missing or stale"
        log.warning("console: refused a POST to %s: %s", request.url.path, why)
        return form, render(request, "refused.html", status_code=403, why=why)

    async def status_page(request: Request) -> Response:
        status = await run_in_threadpool(read_status, settings, console.db, console.app)
        return render(request, "status.html", status=status)

    async def letters_page(request: Request) -> Response:
        chosen = parse_filter(request.query_params)
        found = await run_in_threadpool(
            letters.find_letters, console.db[letters.COLLECTION], chosen.query(), chosen.limit
        )
        tasks = await run_in_threadpool(console.db[letters.COLLECTION].distinct, "task")
        return render(
            request,
            "letters.html",
            letters=found,
            filter=chosen,
            reasons=REASONS,
            tasks=sorted(map(str, tasks)),
        )

    async def letter_page(request: Request) -> Response:
        key = request.path_params["id"]
        letter = await run_in_threadpool(console.db[letters.COLLECTION].find_one, {"_id": key})
        if letter is None:
            return render(request, "missing.html", status_code=404, ids=[key])
        event = letter.get("payload")
        fields = {k: v for k, v in letter.items() if k not in ("payload", "traceback")}
        return render(request, "letter.html", letter=letter, event=event, fields=fields)

    async def checked_selection(request: Request) -> tuple[Any, list[str], Response | None]:
        """checked_form's form and the dead letters it selects, or the page refusing it (403, 400)."""
        form, refused = await checked_form(request)
        if refused:
            return form, [], refused
        ids = selected_ids(form.getlist("id"))
        if not ids:
            why = "no dead letter selected"
            return form, ids, render(request, "missing.html", status_code=400, ids=[], why=why)
        return form, ids, None

    async def replay_action(request: Request) -> Response:
        form, ids, refused = await checked_selection(request)
        if refused:
            return refused
        refresh = form.get("refresh") == "1"
        if console.make_publisher is None:
            return render(request, "missing.html", status_code=503, ids=ids, why="replay is not available")
        make_publisher = console.make_publisher

        def run() -> letters.ReplayReport:
            chosen = letters.letters_by_id(console.db[letters.COLLECTION], ids)
            with replay_lock:
                publisher = make_publisher()
                try:
                    return letters.replay(chosen, console.db, publisher, refresh=refresh)
                finally:
                    close = getattr(publisher, "close", None)
                    if close is not None:
                        close()

        try:
            report = await run_in_threadpool(run)
        except UsageError as exc:
            return render(request, "missing.html", status_code=404, ids=ids, why=str(exc))
        log.info("console: %s (%s)", report.summary(), ", ".join(ids))
        return render(request, "replayed.html", report=report, refresh=refresh)

    async def purge_action(request: Request) -> Response:
        form, ids, refused = await checked_selection(request)
        if refused:
            return refused
        collection = console.db[letters.COLLECTION]
        try:
            chosen = await run_in_threadpool(letters.letters_by_id, collection, ids)
        except UsageError as exc:
            return render(request, "missing.html", status_code=404, ids=ids, why=str(exc))
        if form.get("confirm") != "yes":  # the first POST asks; the second, confirmed, deletes
            return render(request, "purge.html", letters=chosen)
        result = await run_in_threadpool(
            collection.delete_many, {"_id": {"$in": [letter["_id"] for letter in chosen]}}
        )
        log.info("console: purged %d dead letter(s) (%s)", result.deleted_count, ", ".join(ids))
        return render(request, "purged.html", count=result.deleted_count, letters=chosen)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})

    app = Starlette(
        routes=[
            Route("/", status_page),
            Route("/dead-letters", letters_page),
            Route("/dead-letters/replay", replay_action, methods=["POST"]),
            Route("/dead-letters/purge", purge_action, methods=["POST"]),
            Route("/dead-letters/{id:path}", letter_page),
            Route("/health", healthz),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
    )
    return BasicAuth(app, settings.console_user, settings.console_password)


__all__ = ["Console", "create_app"]
