"""`python -m listener [SUBCOMMAND] ...`: the listener and its operator commands.

    python -m listener [flags]                 run the listener until SIGTERM/SIGINT (no subcommand)
    python -m listener health [flags]          liveness/readiness from the heartbeat file (exit 0/1)
    python -m listener gaps [--all]            recorded gaps of lost change stream history
    python -m listener reconcile --gap ID ...  re-emit events for documents written in a gap
    python -m listener dead-letters list|show|replay|purge ...   failed tasks (docs/dead_letters.md)

Configuration comes from the environment (worker/settings.py); the flags only cover what an
operator changes per process. Exit codes of the listener: 0 stopped on request, 2 bad flags or
settings, 3 change stream history lost (the checkpoint fell off the oplog, with
--on-history-lost=fail), 4 other non-resumable MongoDB error. See docs/listener.md.
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
from collections.abc import Sequence
from types import FrameType

import pymongo
from pymongo.errors import ConfigurationError

from listener.exit_codes import EXIT_USAGE

log = logging.getLogger("listener")


# `python -m listener <name> ...` -> <module>.main(rest of argv) -> exit code. Imported lazily, so each
# subcommand's --help works without settings. Anything else (no subcommand, or flags) runs the listener.
SUBCOMMANDS: dict[str, str] = {
    "health": "listener.health",
    "gaps": "listener.gaps",
    "reconcile": "listener.reconcile",
    "dead-letters": "listener.dead_letters",
}


def run_subcommand(name: str, argv: Sequence[str]) -> int:
    module = importlib.import_module(SUBCOMMANDS[name])
    return int(module.main(list(argv)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m listener",
        description="Turn MongoDB change events into Celery tasks (settings from the environment). "
        f"Subcommands: {', '.join(SUBCOMMANDS)} (python -m listener SUBCOMMAND --help).",
        epilog="exit codes: 0 stopped on request, 2 usage/settings, 3 history lost, 4 fatal MongoDB error",
    )
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv[0], argv[1:])
    return run(argv)


def run(argv: Sequence[str]) -> int:
    """Run the listener (the default command)."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    client: pymongo.MongoClient | None = None
    try:
        # Importing anything from worker/ configures worker.app from the environment, so a bad
        # variable raises SettingsError (a ValueError) right here: report it cleanly, exit 2.
        from listener.checkpoints import CheckpointStore
        from listener.health import HealthFile, default_path
        from listener.lease import Lease
        from listener.publish import make_publisher
        from listener.stream import Listener
        from worker.serialization import MONGO_CLIENT_OPTIONS
        from worker.settings import get_settings

        settings = get_settings()
        if args.stream_name:
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
        listener = Listener(
            db,
            make_publisher(settings),
            CheckpointStore(db),
            settings=settings,
            idle_checkpoint_seconds=args.idle_checkpoint_interval,
            summary_seconds=args.summary_interval,
            lease=lease,
            health=HealthFile(health_path, stream, owner=lease.owner),
            on_history_lost=args.on_history_lost,
        )
    except (ValueError, ConfigurationError) as exc:
        log.error("invalid settings: %s", exc)
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
    log.info("listener %s starting for stream %s (health file %s)", lease.owner, stream, health_path)
    # The start-up objects (modules, clients) live as long as the process: out of the collector's
    # reach, its full passes stay short instead of pausing the loop for 15-20 ms (docs/performance.md).
    gc.freeze()
    try:
        return listener.run()
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
