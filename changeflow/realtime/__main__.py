"""`changeflow realtime` (also `python -m realtime` in the checkout): the realtime gateway.

    changeflow realtime                 serve Socket.IO clients on REALTIME_HOST:REALTIME_PORT
    changeflow realtime token USER_ID   print a client token for USER_ID (stdout: the token alone)

Both need REALTIME_SECRET (at least 32 characters); bad settings: one line naming the variable, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from changeflow.worker.settings import Settings, SettingsError, get_settings, realtime_secret_problems


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="changeflow realtime",
        description="The realtime gateway: Socket.IO notifications from changeflow tasks.",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the gateway (the default) until SIGTERM/SIGINT")
    token = commands.add_parser("token", help="print a client token for USER_ID, valid REALTIME_TOKEN_TTL s")
    token.add_argument("user_id", metavar="USER_ID")
    return parser


def _settings() -> Settings | None:
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return None
    problems = realtime_secret_problems(settings)
    if problems:
        print(f"invalid settings: {problems[0]}", file=sys.stderr)
        return None
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = _settings()
    if settings is None:
        return 2
    if args.command == "token":
        from changeflow.realtime.tokens import make_token

        try:
            print(make_token(args.user_id, settings.realtime_secret))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    from changeflow.realtime.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
