"""CheckpointStore: one resume token per stream name."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import mongomock

from changeflow.listener.checkpoints import COLLECTION, CheckpointStore


def test_load_without_a_checkpoint_is_none() -> None:
    assert CheckpointStore(mongomock.MongoClient().db).load("changeflow") is None


def test_save_then_load_per_stream() -> None:
    db = mongomock.MongoClient().db
    store = CheckpointStore(db)
    store.save("a", {"_data": "8201"})
    store.save("b", {"_data": "8299"})
    store.save("a", {"_data": "8202"})  # moves forward in place
    assert store.load("a") == {"_data": "8202"}
    assert store.load("b") == {"_data": "8299"}
    document = db[COLLECTION].find_one({"_id": "a"})
    assert document is not None
    assert set(document) == {"_id", "resume_token", "updated_at"}
    updated_at = document["updated_at"].replace(tzinfo=UTC)  # mongomock returns naive UTC
    assert datetime.now(UTC) - updated_at < timedelta(seconds=60)
    assert db[COLLECTION].count_documents({}) == 2
