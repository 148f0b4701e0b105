"""python -m changeflow.testing.mongo_double [--host H] [--port N] [--oplog-size N]

Prints `ready mongodb://HOST:PORT/?replicaSet=rs0` once it accepts connections; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from types import FrameType

from changeflow.testing.mongo_double.server import MongoDouble


def freeze_after_full_collections() -> None:
    """After each full (generation 2) garbage collection, move the survivors to the permanent
    generation, so the next full pass only visits objects created since. Stored documents and kept
    change events are long-lived: without this, full passes over them made the collector's pauses
    grow with the data (most of it in bulk loads). Freed by reference counting as before; only
    reference cycles among frozen objects would stay. Only for the server's own process."""

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info.get("generation") == 2:
            gc.freeze()

    gc.callbacks.append(on_collection)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m changeflow.testing.mongo_double", description="MongoDB wire-protocol test server"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=27017, help="port to bind; 0 picks a free one")
    parser.add_argument("--oplog-size", type=int, default=100_000, help="change events kept for resuming")
    parser.add_argument("--log-level", default="WARNING", help="logging level for stderr (default WARNING)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    freeze_after_full_collections()
    server = MongoDouble(port=args.port, host=args.host, oplog_size=args.oplog_size)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()  # the socket is bound and listening before start() returns
    print(f"ready {server.uri}", flush=True)
    while not stop.wait(0.5):
        pass
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
