"""`python -m bench.listener_proc`: the Listener with PipelinedPublisher, as its own process.

For the latency benchmark until `python -m listener` can select the pipelined publisher: the same
`Listener` class, settings from the environment (MONGODB_URI, MONGODB_DB, CELERY_BROKER_URL,
LISTENER_MAX_AWAIT_MS, ...), checkpoints in MongoDB, SIGTERM stops it after the batch in flight.
"""

from __future__ import annotations

import logging
import signal
import sys

import pymongo

from listener.checkpoints import CheckpointStore
from listener.pipelined import PipelinedPublisher
from listener.stream import Listener
from worker.settings import get_settings


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    client: pymongo.MongoClient = pymongo.MongoClient(settings.mongodb_uri, serverSelectionTimeoutMS=10_000)
    db = client[settings.mongodb_db]
    listener = Listener(db, PipelinedPublisher(), CheckpointStore(db), settings=settings)
    signal.signal(signal.SIGTERM, lambda *_: listener.stop())
    signal.signal(signal.SIGINT, lambda *_: listener.stop())
    try:
        return listener.run()
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
