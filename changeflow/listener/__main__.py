"""`python -m listener [SUBCOMMAND] ...`: the listener and its operator commands.

    python -m listener [-A MODULE] [flags]     run the listener until SIGTERM/SIGINT (no subcommand)
    python -m listener health [flags]          liveness/readiness from the heartbeat file (exit 0/1)
    python -m listener gaps [--all]            recorded gaps of lost change stream history
    python -m listener reconcile --gap ID ...  re-emit events for documents written in a gap
    python -m listener dead-letters list|show|replay|purge ...   failed tasks (docs/dead_letters.md)
    python -m listener backfill --collection C --task T ...   a task over existing documents

`-A/--app MODULE` (anywhere on the line; default CHANGEFLOW_APP, else `worker`, this repository's
app) selects the changeflow app, as `celery -A` does: its routes, its tasks, its Celery configuration.
`changeflow listen ...` (changeflow/cli.py) is the same command.

Configuration comes from the environment (changeflow/worker/settings.py); the flags only cover what an
operator changes per process. Everything is checked before the listener starts: a bad setting or flag
(a health file it cannot write, a broker URL its publisher cannot use) stops it with one line naming
it, passwords masked. Exit codes of the listener: 0 stopped on request, 2 bad flags or settings
(also: MongoDB refuses the credentials of MONGODB_URI), 3 change stream history lost (the checkpoint
fell off the oplog, with --on-history-lost=fail), 4 other non-resumable MongoDB error, 1 a crash
(a bug; the traceback is logged with passwords masked). See docs/listener.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from types import FrameType

import pymongo
from pymongo.errors import ConfigurationError

from changeflow import tracing
from changeflow.listener.exit_codes import EXIT_CRASH, EXIT_USAGE

log = logging.getLogger("listener")


# `python -m listener <name> ...` -> <module>.main(rest of argv) -> exit code. Imported lazily, so each
# subcommand's --help works without settings. Anything else (no subcommand, or flags) runs the listener.
SUBCOMMANDS: dict[str, str] = {
    "health": "changeflow.listener.health",
    "gaps": "changeflow.listener.gaps",
    "reconcile": "changeflow.listener.reconcile",
    "dead-letters": "changeflow.listener.dead_letters",
    "backfill": "changeflow.backfill.cli",
}


# Subcommands that publish through the app (the others read MongoDB or a file only).
APP_SUBCOMMANDS = frozenset({"reconcile", "dead-letters", "backfill"})
APP_HELP = "the changeflow app, as celery -A takes it (default: CHANGEFLOW_APP, else worker: this repo's)"


def run_subcommand(name: str, argv: Sequence[str], app: str | None = None) -> int:
    module = importlib.import_module(SUBCOMMANDS[name])
    if name in APP_SUBCOMMANDS:
        return int(module.main(list(argv), app=app))
    return int(module.main(list(argv)))


def pop_app_option(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(-A/--app value or None, argv without it): the option is taken anywhere, as celery's -A.

    ValueError when the option has no value.
    """
    rest: list[str] = []
    spec: str | None = None
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item in ("-A", "--app"):
            if i + 1 >= len(items) or not items[i + 1].strip() or items[i + 1].startswith("-"):
                raise ValueError(f"{item} needs a module (e.g. {item} acme.effects)")
            spec = items[i + 1]
            i += 2
            continue
        if item.startswith("--app="):
            spec = item.partition("=")[2]
        elif item.startswith("-A") and len(item) > 2 and not item.startswith("--"):
            spec = item[2:]
        else:
            rest.append(item)
        if spec is not None and not spec.strip():
            raise ValueError("-A/--app needs a module (e.g. -A acme.effects)")
        i += 1
    return spec, rest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m listener",
        description="Turn MongoDB change events into Celery tasks (settings from the environment). "
        f"Subcommands: {', '.join(SUBCOMMANDS)} (python -m listener SUBCOMMAND --help).",
        epilog="exit codes: 0 stopped on request, 2 usage/settings, 3 history lost, 4 fatal MongoDB error",
    )
    parser.add_argument("-A", "--app", metavar="MODULE", help=APP_HELP)
    parser.add_argument(
        "--stream-name",
        help="checkpoint name of this stream (default: LISTENER_STREAM_NAME)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="DEBUG also logs every published batch (default: INFO)",
    )
    parser.add_argument(
        "--summary-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how often to log the INFO summary: events seen, tasks published, checkpoint (default: 60)",
    )
    parser.add_argument(
        "--idle-checkpoint-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often an idle stream saves its advancing resume token (default: 5)",
    )
    parser.add_argument(
        "--on-history-lost",
        choices=["fail", "resume-now"],
        help="checkpoint no longer in the oplog: record the gap and exit 3 (fail), or record it and "
        "continue from now (resume-now) (default: LISTENER_ON_HISTORY_LOST, fail)",
    )
    parser.add_argument(
        "--health-file",
        metavar="PATH",
        help="heartbeat file (default: LISTENER_HEALTH_FILE, else /tmp/changeflow-listener-<stream>.json)",
    )
    args = parser.parse_args(argv)
    # An empty value given on purpose must not quietly mean the default (a typo'd variable in a script).
    for flag, value in (("--stream-name", args.stream_name), ("--health-file", args.health_file)):
        if value is not None and not value.strip():
            parser.error(f"{flag} must not be empty")
    if args.summary_interval <= 0 or args.idle_checkpoint_interval <= 0:
        parser.error("--summary-interval and --idle-checkpoint-interval must be positive")
    return args


def scrub(text: str) -> str:
    """`text` with the passwords of the URL settings masked (changeflow.worker.settings.scrub)."""
    try:
        from changeflow.worker.settings import scrub as scrub_passwords
    except Exception:  # worker cannot be imported: its SettingsError messages mask URLs themselves
        return text
    return scrub_passwords(text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        app_spec, argv = pop_app_option(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if argv and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv[0], argv[1:], app_spec)
    return run(argv, app_spec)


def run(argv: Sequence[str], app_spec: str | None = None) -> int:
    """Run the listener (the default command) for the app `app_spec` names."""
    args = parse_args(argv)
    app_spec = app_spec or args.app
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    client: pymongo.MongoClient | None = None
    try:
        # Loading the app reads the settings from the environment, so a bad variable raises
        # SettingsError (a ValueError) right here, as does an app that cannot run (AppError): one
        # line, exit 2.
        from changeflow.app import load_app
        from changeflow.listener.backpressure import Backpressure, BrokerQueueLength
        from changeflow.listener.checkpoints import CheckpointStore
        from changeflow.listener.health import HealthFile, default_path
        from changeflow.listener.lease import Lease
        from changeflow.listener.metrics import ListenerMetrics, serve
        from changeflow.listener.publish import make_publisher, task_queues
        from changeflow.listener.stream import Listener
        from changeflow.worker.serialization import MONGO_CLIENT_OPTIONS

        app = load_app(app_spec)
        settings = app.settings
        tracing.setup("changeflow-listener", instrument=False)  # only when OpenTelemetry is configured
        if args.stream_name is not None:
            settings = dataclasses.replace(settings, listener_stream_name=args.stream_name)
        stream = settings.listener_stream_name
        client = pymongo.MongoClient(
            settings.mongodb_uri, appname="changeflow-listener", **MONGO_CLIENT_OPTIONS
        )
        db = client[settings.mongodb_db]
        lease = Lease(
            db,
            stream,
            ttl_seconds=settings.listener_lease_ttl_seconds,
            renew_seconds=settings.listener_lease_renew_seconds,
        )
        health_path = args.health_file or settings.listener_health_file or default_path(stream)
        health = HealthFile(health_path, stream, owner=lease.owner)
        try:
            health.check_writable()  # else `health` would call a working listener unhealthy
        except OSError as exc:
            which = "--health-file" if args.health_file else "LISTENER_HEALTH_FILE"
            raise ValueError(f"{which}: cannot write the health file {health_path}: {exc}") from None
        publisher = make_publisher(settings, app)
        check = getattr(publisher, "check", None)
        if check is not None:
            check()  # a broker URL the publisher cannot use fails now, not at the first event
        backpressure = None
        if settings.listener_max_queue_length:
            queues = task_queues(app, [name for route in app.routes for name in route.tasks])
            backpressure = Backpressure(BrokerQueueLength(app, queues), settings.listener_max_queue_length)
        metrics = ListenerMetrics(stream)
        if settings.listener_metrics_port is not None:
            # A client of its own for the scrape-time queries: a short wait when MongoDB is away.
            metrics_client = pymongo.MongoClient(
                settings.mongodb_uri,
                appname="changeflow-listener-metrics",
                serverSelectionTimeoutMS=2000,
                **MONGO_CLIENT_OPTIONS,
            )
            metrics.db = metrics_client[settings.mongodb_db]
            try:
                serve(metrics, settings.metrics_host, settings.listener_metrics_port)
            except OSError as exc:
                where = f"{settings.metrics_host}:{settings.listener_metrics_port}"
                raise ValueError(f"LISTENER_METRICS_PORT: cannot serve metrics on {where}: {exc}") from None
        listener = Listener(
            db,
            publisher,
            CheckpointStore(db),
            app.routes,
            settings=settings,
            idle_checkpoint_seconds=args.idle_checkpoint_interval,
            summary_seconds=args.summary_interval,
            lease=lease,
            health=health,
            on_history_lost=args.on_history_lost,
            backpressure=backpressure,
            metrics=metrics,
        )
    except (ValueError, ConfigurationError) as exc:
        what = "app" if type(exc).__name__ == "AppError" else "settings"  # changeflow.app.AppError
        log.error("invalid %s: %s", what, scrub(str(exc)))
        if client is not None:
            client.close()
        return EXIT_USAGE

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: finishing the current batch", signal.Signals(signum).name)
        # From another thread: stop() sets a threading.Event, whose lock the interrupted main
        # thread may be holding at this very moment.
        threading.Thread(target=listener.stop, name="listener-stop").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "listener %s starting for stream %s, app %s: %d routes to %d tasks (health file %s)",
        lease.owner, stream, app.main, len(app.routes),
        len({name for route in app.routes for name in route.tasks}), health_path,
    )  # fmt: skip
    # The start-up objects (modules, clients) live as long as the process: out of the collector's
    # reach, its full passes stay short instead of pausing the loop for 15-20 ms (docs/performance.md).
    gc.freeze()
    try:
        return listener.run()
    except Exception:
        # A bug: its traceback may quote a URL or an error message holding a password.
        log.critical("listener crashed:\n%s", scrub(traceback.format_exc()))
        return EXIT_CRASH
    finally:
        client.close()
        tracing.shutdown()  # export the spans still buffered


if __name__ == "__main__":
    sys.exit(main())
