"""The quickstart demo: the whole pipeline on this machine, sample writes, and what came of them.

    python -m harness.quickstart            # runs until Ctrl-C, Flower on http://127.0.0.1:5555
    python -m harness.quickstart --exit     # report, then stop (used by the smoke test)

It starts redis-server (a private one on a free port), the MongoDB test server (or uses MONGODB_URI),
an SMTP sink, the listener, two Celery workers, Flower, the realtime gateway (demo sign-in on) and
the operator console (127.0.0.1, a generated password printed here only),
then writes users, orders, follows and posts with plain pymongo and prints the emails received, the
profiles, the analytics counters and what a Socket.IO client got live. While it runs, a user posts
every few seconds, for the page on http://127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import random
import shlex
import signal
import socket
import sys
import time
from types import FrameType

import socketio
from bson import ObjectId

from changeflow.realtime.tokens import make_token
from changeflow.worker.settings import mask_url
from harness.effects import compare, observe
from harness.pipeline import LocalPipeline, wait_until
from harness.social import post, write_follows_and_posts
from harness.workload import apply, plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--orders", type=int, default=8)
    parser.add_argument("--flower-port", type=int, default=5555)
    parser.add_argument("--realtime-port", type=int, default=8000, help="the realtime gateway's page")
    parser.add_argument(
        "--exit", action="store_true", help="stop after the report instead of waiting for Ctrl-C"
    )
    args = parser.parse_args(argv)

    # Ctrl-C and SIGTERM both end the demo through the same clean shutdown.
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    for port, what, flag in ((args.flower_port, "Flower", "--flower-port"),
                             (args.realtime_port, "the realtime gateway", "--realtime-port")):  # fmt: skip
        taken = port_taken(port)
        if taken:
            print(
                f"quickstart: port {port} ({what}) is taken ({taken}); choose another with {flag} N",
                file=sys.stderr,
            )
            return 2
    print(
        "starting redis-server, the MongoDB test server, an SMTP sink, the listener, 2 workers, Flower, "
        "the realtime gateway, the console ..."
    )
    pipeline = LocalPipeline(
        workers=2,
        flower_port=args.flower_port,
        realtime_port=args.realtime_port,
        realtime_demo=True,
        console=True,
    )
    try:
        pipeline.start()
        assert pipeline.sink is not None and pipeline.redis is not None
        print(f"  MongoDB   {mask_url(pipeline.mongodb_uri)}  (database {pipeline.db_name})")
        print(f"  Redis     {pipeline.redis.url}")
        print(f"  SMTP sink {pipeline.sink.url}")
        print(f"  realtime  {pipeline.realtime_url}  (the page; demo sign-in on)")
        print(f"  console   {pipeline.console_url}  (user admin, password {pipeline.console_password})")
        print(f"  logs      {pipeline.log_dir}")
        work = plan(users=args.users, orders=args.orders)
        print(
            f"\nwriting {len(work.users)} users, {len(work.orders)} orders and {len(work.transitions)} "
            "status changes with plain pymongo, plus one user without an email ..."
        )
        pipeline.db.users.insert_one({"_id": ObjectId(), "name": "Nobody (no email)"})
        apply(pipeline.db, work)
        # A Socket.IO client signed in as the first user, as the page does, before the posts.
        live = LiveClient(pipeline.realtime_url, make_token(work.users[0]["_id"], pipeline.realtime_secret))
        print(f"writing follows (each user follows the next 2) and {len(work.users)} posts ...")
        write_follows_and_posts(pipeline.db, work.users)
        finished = wait_until(
            lambda: compare(work, observe(pipeline.db, pipeline.sink)).lost == 0, timeout=60
        )
        live_done = wait_until(lambda: live.counts() == {"new_post": 1, "feed_update": 2}, timeout=30)
        time.sleep(1)
        report(pipeline, finished)
        live.report(work.users[0]["name"], live_done)
        live.close()
        finished = finished and live_done
        print_operator_env(pipeline.env)
        if args.exit:
            return 0 if finished else 1
        print(f"\nFlower: http://127.0.0.1:{args.flower_port}")
        print(
            f"Live notifications: {pipeline.realtime_url}  (sign in as a demo user; a user posts every 5 s)"
        )
        print(
            f"Operator console: {pipeline.console_url}  (user admin, password {pipeline.console_password}; "
            "the dead letter of the user without an email is there)"
        )
        print("(Ctrl-C stops everything)")
        number = 0
        while True:
            time.sleep(5)
            number += 1
            author = random.choice(work.users)
            pipeline.db.posts.insert_one(post(author, f"Post {number} from {author['name']}"))
    except KeyboardInterrupt:
        print("\nstopping ...")
        return 0
    finally:
        pipeline.stop()


def report(pipeline: LocalPipeline, finished: bool) -> None:
    assert pipeline.sink is not None
    db = pipeline.db
    effects = observe(db, pipeline.sink)
    print(f"\nemails received by the SMTP sink: {effects.emails}")
    for message in pipeline.sink.messages:
        print(f"  to {message['To']}: {message['Subject']}")
    print(f"profiles: {db.profiles.count_documents({})}")
    print("order analytics (day:status -> count):")
    for counter in db.order_analytics.find().sort("_id"):
        print(f"  {counter['_id']}: {counter['count']}")
    print(f"dead letters: {len(effects.dead_letters)}")
    for letter in effects.dead_letters:
        print(f"  {letter['task']} ({letter['reason']}): {letter['error']}")
    print("all expected effects arrived" if finished else "NOT all expected effects arrived in time")


class LiveClient:
    """A Socket.IO client of the gateway counting what it receives."""

    def __init__(self, url: str, token: str) -> None:
        self.received: list[tuple[str, dict]] = []
        self.client = socketio.Client(reconnection=False)
        for event in ("new_post", "feed_update"):
            self.client.on(event, lambda data, event=event: self.received.append((event, data)))
        self.client.connect(url, auth={"token": token}, transports=["websocket"], wait_timeout=10)

    def counts(self) -> dict[str, int]:
        counts = {"new_post": 0, "feed_update": 0}
        for event, _ in list(self.received):
            counts[event] += 1
        return counts

    def report(self, name: str, done: bool) -> None:
        print(f"a Socket.IO client signed in as {name} received live:")
        for event, data in list(self.received):
            print(f"  {event}: {data.get('author_name')}: {data['post'].get('text')}")
        print(
            "all expected notifications arrived" if done else "NOT all expected notifications arrived in time"
        )

    def close(self) -> None:
        self.client.disconnect()


def port_taken(port: int) -> str | None:
    """Why a server could not listen on 127.0.0.1:`port`, or None when it can."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


# What the operator commands (`changeflow dead-letters list`, `health`, ...) need.
OPERATOR_SETTINGS = ("MONGODB_URI", "MONGODB_DB", "CELERY_BROKER_URL", "REDIS_URL")


def print_operator_env(env: dict[str, str]) -> None:
    print("\nto inspect this demo from another shell (while it runs):")
    print("  . .venv/bin/activate")
    for name in OPERATOR_SETTINGS:
        print(f"  export {name}={shlex.quote(env[name])}")
    print("  changeflow dead-letters list      # or: python -m listener dead-letters list")


if __name__ == "__main__":
    sys.exit(main())
