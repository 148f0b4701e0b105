"""Sample social writes for the realtime demo: who follows whom, and posts.

User i follows the next two users (i+1 and i+2, wrapping), and each user writes one post, so every
user is told about one post of their own (`new_post`) and two of the people they follow
(`feed_update`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from pymongo.database import Database

FOLLOWS = 2  # each user follows the next FOLLOWS users


def follows(users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`followers` documents: {user_id: the followed user, follower_id: the follower}."""
    n = len(users)
    return [
        {"user_id": users[(i + k) % n]["_id"], "follower_id": user["_id"]}
        for i, user in enumerate(users)
        for k in range(1, min(FOLLOWS, n - 1) + 1)
    ]


def post(author: dict[str, Any], text: str) -> dict[str, Any]:
    return {"_id": ObjectId(), "author_id": author["_id"], "text": text, "created_at": datetime.now(UTC)}


def write_follows_and_posts(db: Database, users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write the follows, then one post per user, with plain pymongo; the posts written."""
    db.followers.insert_many(follows(users))
    posts = [post(user, f"Hello from {user['name']}!") for user in users]
    for one in posts:
        db.posts.insert_one(dict(one))
    return posts
