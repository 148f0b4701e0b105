"""Live notifications of new posts over WebSockets (Socket.IO), the guide's "WebSocket updates".

A post `{author_id, text, created_at}` inserted in `posts` emits `new_post` to its author's room and
`feed_update` to the room of each follower (`followers`: `{user_id, follower_id}`, read in
`_id`-ordered pages of REALTIME_FOLLOWER_BATCH_SIZE, one emit per page). The emits go through Redis
to the realtime gateways (changeflow/realtime/), which deliver them to the connected clients.

At-least-once: an emit cannot be taken back. The dedup guard makes a normal redelivery a no-op, but a
task that dies after emitting and before its key is marked done emits again when it reruns. Each
payload carries `post_id` and `event_id` so a client can drop what it already shows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pymongo.collection import Collection

from changeflow.realtime.emitter import get_emitter
from changeflow.realtime.messages import post_notification, user_room
from changeflow.worker.errors import PermanentTaskError
from changeflow.worker.mongo import get_db
from changeflow.worker.settings import get_settings
from tasks.app import app

Page = list[Mapping[str, Any]]


def pages(fetch: Callable[[Any, int], Page], size: int) -> Iterator[Page]:
    """Every document `fetch(after_id, size)` gives, a page at a time, resuming after the last _id.

    `fetch` returns up to `size` documents with `_id` greater than `after_id` (None: from the
    start), in `_id` order; a short page is the last.
    """
    after = None
    while True:
        page = fetch(after, size)
        if page:
            yield page
        if len(page) < size:
            return
        after = page[-1]["_id"]


def follower_pages(followers: Collection, author_id: Any, size: int) -> Iterator[Page]:
    """The `followers` documents of `author_id` (user_id == author_id), in pages of `size`."""

    def fetch(after: Any, limit: int) -> Page:
        query: dict[str, Any] = {"user_id": author_id}
        if after is not None:
            query["_id"] = {"$gt": after}
        return list(followers.find(query, {"follower_id": 1}).sort("_id", 1).limit(limit))

    return pages(fetch, size)


@app.on("posts", "insert", name="tasks.push_new_post")
def push_new_post(event: dict[str, Any]) -> None:
    """Tell the author (`new_post`) and each follower (`feed_update`) about a new post."""
    post = event.get("fullDocument")
    if not isinstance(post, Mapping):
        raise PermanentTaskError("posts insert without its document")
    author_id = post.get("author_id")
    if author_id is None:
        raise PermanentTaskError("the post has no author_id")
    settings = get_settings()
    emitter = get_emitter(settings)
    db = get_db()
    author = db.users.find_one({"_id": author_id}, {"name": 1}) or {}
    payload = post_notification(post, event_id=str(event["_id"]["_data"]), author_name=author.get("name"))
    emitter.send("new_post", payload, [user_room(author_id)])
    for page in follower_pages(db.followers, author_id, settings.realtime_follower_batch_size):
        rooms = sorted({user_room(f["follower_id"]) for f in page if f.get("follower_id") is not None})
        emitter.send("feed_update", payload, rooms)
