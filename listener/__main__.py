"""`python -m listener`: run the listener until SIGTERM/SIGINT; the exit code says why it stopped.

Configuration comes from the environment (worker/settings.py); the flags only cover what an
operator changes per process. Exit codes: 0 stopped on request, 2 bad flags or settings,
3 change stream history lost (the checkpoint fell off the oplog), 4 other non-resumable MongoDB error.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m listener",
        description="Turn MongoDB change events into Celery tasks (settings from the environment).",
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "dead-letters":
        from listener import dead_letters

        return dead_letters.main(argv[1:])
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
        from listener.publish import CeleryPublisher
        from listener.stream import Listener
        from worker.settings import get_settings

        settings = get_settings()
        if args.stream_name:
            settings = dataclasses.replace(settings, listener_stream_name=args.stream_name)
        client = pymongo.MongoClient(settings.mongodb_uri, appname="changeflow-listener")
        db = client[settings.mongodb_db]
        listener = Listener(
            db,
            CeleryPublisher(),
            CheckpointStore(db),
            settings=settings,
            idle_checkpoint_seconds=args.idle_checkpoint_interval,
            summary_seconds=args.summary_interval,
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
    try:
        return listener.run()
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
