from __future__ import annotations

import datetime as dt

import pytest
from bson import Timestamp

from tasks.analytics import Bucket, analytics_bucket, event_time

WALL = dt.datetime(2026, 11, 23, 23, 59, 59, 999000)


def test_insert_counts_its_initial_status() -> None:
    event = {"operationType": "insert", "fullDocument": {"status": "pending"}, "wallTime": WALL}
    bucket = analytics_bucket(event)
    assert bucket == Bucket("2026-11-23", "pending")
    assert bucket is not None and bucket.id == "2026-11-23:pending"


def test_update_counts_the_new_status_from_updated_fields() -> None:
    event = {
        "operationType": "update",
        "updateDescription": {"updatedFields": {"status": "shipped"}},
        "fullDocument": {"status": "delivered"},
        "wallTime": WALL,
    }
    assert analytics_bucket(event) == Bucket("2026-11-23", "shipped")


@pytest.mark.parametrize(
    "event",
    [
        {"operationType": "update", "updateDescription": {"updatedFields": {"total": 3}}},
        {"operationType": "update", "updateDescription": {"updatedFields": {"status": None}}},
        {"operationType": "delete", "documentKey": {"_id": 1}},
        {"operationType": "replace", "fullDocument": {"status": "shipped"}},
        {"operationType": "insert", "fullDocument": {"total": 3}},
    ],
)
def test_events_without_a_status_change_count_for_nothing(event: dict) -> None:
    assert analytics_bucket({**event, "wallTime": WALL}) is None


def test_day_is_utc() -> None:
    # 23:30 at UTC-5 is the next day in UTC.
    aware = dt.datetime(2026, 11, 23, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    event = {"operationType": "insert", "fullDocument": {"status": "new"}, "wallTime": aware}
    assert analytics_bucket(event) == Bucket("2026-11-24", "new")


def test_cluster_time_when_no_wall_time() -> None:
    ts = Timestamp(int(dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.UTC).timestamp()), 1)
    assert event_time({"clusterTime": ts}) == dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.UTC)
    event = {"operationType": "insert", "fullDocument": {"status": "new"}, "clusterTime": ts}
    assert analytics_bucket(event) == Bucket("2026-01-02", "new")


def test_no_time_at_all_is_an_error() -> None:
    with pytest.raises(ValueError, match="neither wallTime nor clusterTime"):
        analytics_bucket({"operationType": "insert", "fullDocument": {"status": "new"}})
