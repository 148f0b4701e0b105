"""The `changeflow` command (installed by pip): the listener and the operator commands of an app.

    changeflow listen -A acme.effects [flags]       run the listener (as `python -m listener`)
    changeflow dead-letters -A acme.effects list    failed tasks (docs/dead_letters.md)
    changeflow health | gaps | reconcile ...        as `python -m listener <command>`
    changeflow backfill -A acme.effects --collection C --task T   a task over existing documents
    changeflow realtime [token USER_ID]             the realtime gateway (as `python -m realtime`)
    changeflow console -A acme.effects              the operator console (web pages, basic auth)

`-A/--app MODULE` may go anywhere on the line; without it CHANGEFLOW_APP, else this repository's app.
Workers are Celery's own: `celery -A acme.effects worker`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = ("listen", "dead-letters", "health", "gaps", "reconcile", "backfill", "realtime", "console")
USAGE = (
    "usage: changeflow {listen,dead-letters,health,gaps,reconcile,backfill,realtime,console}"
    " [-A MODULE] ...\n"
    "  listen          run the listener for the app's routes (until SIGTERM/SIGINT)\n"
    "  dead-letters    list|show|replay|purge failed tasks\n"
    "  health          liveness/readiness from the listener's heartbeat file\n"
    "  gaps            recorded gaps of lost change stream history\n"
    "  reconcile       re-emit events for documents written in a gap\n"
    "  backfill        run a task over existing documents; resume ID, list, show ID\n"
    "  realtime        the Socket.IO gateway; `realtime token USER_ID` prints a client token\n"
    "  console         the operator console: stream status and dead letters in a browser\n"
    "-A/--app MODULE selects the app, as celery -A does (default: CHANGEFLOW_APP, else worker).\n"
    "Each command has --help."
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from changeflow.listener.__main__ import main as listener_main
    from changeflow.listener.__main__ import pop_app_option

    try:
        app_spec, rest = pop_app_option(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rest or rest[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if rest else sys.stderr)
        return 0 if rest else 2
    command, args = rest[0], rest[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    if command == "realtime":  # serves no app: the tasks emit, the gateway delivers
        from changeflow.realtime.__main__ import main as realtime_main

        return realtime_main(args)
    app_args = ["-A", app_spec] if app_spec else []
    if command == "console":
        from changeflow.console.__main__ import main as console_main

        return console_main([*app_args, *args])
    if command == "listen":
        return listener_main([*app_args, *args])
    return listener_main([command, *app_args, *args])


if __name__ == "__main__":
    sys.exit(main())
