"""`changeflow console -A APP [--host HOST] [--port PORT]`: serve the operator console until SIGTERM/SIGINT.

Host and port default to CONSOLE_HOST / CONSOLE_PORT (127.0.0.1:8100; port 0: any free one, the
ready line says which). Off 127.0.0.1 it refuses to start without CONSOLE_PASSWORD (exit 2); on
127.0.0.1 without one it serves without authentication and says so. Bad settings or app: one
line, exit 2; the address cannot be bound: exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger("changeflow.console")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="changeflow console",
        description="The operator console: the stream's status and the dead letters, in a browser.",
    )
    parser.add_argument("-A", "--app", metavar="MODULE", help="the changeflow app (default: CHANGEFLOW_APP)")
    parser.add_argument("--host", help="address to listen on (default: CONSOLE_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: CONSOLE_PORT, 8100; 0: any free port)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from changeflow.app import AppError, load_app
    from changeflow.worker.settings import SettingsError, console_password_problems

    try:
        app = load_app(args.app)
    except (AppError, SettingsError) as exc:
        what = "app" if isinstance(exc, AppError) else "settings"
        print(f"invalid {what}: {exc}", file=sys.stderr)
        return 2
    settings = app.settings
    host = args.host or settings.console_host
    port = settings.console_port if args.port is None else args.port
    if not 0 <= port <= 65535:
        print(f"error: --port must be between 0 and 65535, got {port}", file=sys.stderr)
        return 2
    problems = console_password_problems(settings, host)
    if problems:
        print(f"invalid settings: {problems[0]}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(app, host, port))
    except KeyboardInterrupt:
        return 0


async def serve(app: object, host: str, port: int) -> int:
    """Run the console for the changeflow `app` until SIGINT/SIGTERM; 0 when stopped, 1 when it could
    not listen."""
    import pymongo
    import uvicorn

    from changeflow.console.web import Console, create_app
    from changeflow.listener.publish import make_publisher
    from changeflow.worker.serialization import MONGO_CLIENT_OPTIONS
    from changeflow.worker.settings import mask_url

    settings = app.settings  # type: ignore[attr-defined]
    client: pymongo.MongoClient = pymongo.MongoClient(
        settings.mongodb_uri,
        appname="changeflow-console",
        serverSelectionTimeoutMS=5_000,
        **MONGO_CLIENT_OPTIONS,
    )
    console = Console(
        settings=settings,
        db=client[settings.mongodb_db],
        app=app,  # type: ignore[arg-type]
        make_publisher=lambda: make_publisher(settings, app),  # type: ignore[arg-type]
    )
    config = uvicorn.Config(
        create_app(console), host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    running = asyncio.create_task(server.serve())
    while not server.started and not running.done():
        await asyncio.sleep(0.05)
    if running.done():
        log.error("the console could not listen on %s:%s", host, port)
        client.close()
        return 1
    bound = server.servers[0].sockets[0].getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    log.info(
        "changeflow console ready on http://%s:%s (MongoDB %s, database %s, %s)",
        url_host, bound, mask_url(settings.mongodb_uri), settings.mongodb_db,
        f"user {settings.console_user}" if settings.console_password
        else "NO authentication: CONSOLE_PASSWORD is not set (only on 127.0.0.1)",
    )  # fmt: skip
    try:
        await running
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
