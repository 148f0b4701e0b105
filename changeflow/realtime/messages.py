"""What goes over the wire: room names and JSON payloads.

Rooms are per user, `user:<id>` with the id's string form (an ObjectId: its 24 hex digits). Payloads
are MongoDB Extended JSON, relaxed (`{"$oid": ...}`, `{"$date": "...Z"}`), turned into plain JSON
objects so Socket.IO clients receive objects, not strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from bson import json_util
from bson.json_util import RELAXED_JSON_OPTIONS

ROOM_PREFIX = "user:"


def user_room(user_id: object) -> str:
    """The room of a user's connections."""
    return f"{ROOM_PREFIX}{user_id}"


def to_json(value: Any) -> Any:
    """`value` (BSON types allowed) as relaxed Extended JSON, parsed back into dicts and lists."""
    return json.loads(json_util.dumps(value, json_options=RELAXED_JSON_OPTIONS))


def post_notification(
    post: Mapping[str, Any], *, event_id: str, author_name: str | None = None
) -> dict[str, Any]:
    """The payload of `new_post` and `feed_update`.

    `post_id` and `event_id` (the change event's id) let a client drop a notification it already
    shows: a redelivered task may emit again (at-least-once).
    """
    return {
        "post_id": str(post.get("_id")),
        "event_id": event_id,
        "author_name": author_name,
        "post": to_json(dict(post)),
    }
