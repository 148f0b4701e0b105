"""changeflow.realtime: client tokens, room names, payloads, the follower paging of tasks.posts, and
the realtime settings (the secret required by the gateway, never shown)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import Decimal128, Int64, ObjectId

from changeflow.realtime.messages import post_notification, to_json, user_room
from changeflow.realtime.tokens import InvalidToken, make_token, read_token, token_of
from changeflow.worker.settings import (
    MASK,
    Settings,
    SettingsError,
    realtime_secret_problems,
    scrub,
)
from tasks.posts import pages

SECRET = "s3cret-" + "x" * 40
USER = ObjectId("65f1a2b3c4d5e6f708192a3b")


def reason(token: object, secret: str = SECRET, max_age: int = 3600) -> str:
    with pytest.raises(InvalidToken) as refused:
        read_token(token, secret, max_age)
    return refused.value.reason


# Tokens ------------------------------------------------------------------------------------------


def test_a_token_names_its_user_by_the_ids_string_form() -> None:
    token = make_token(USER, SECRET)
    assert read_token(token, SECRET, 3600) == "65f1a2b3c4d5e6f708192a3b"
    assert read_token(make_token("alice", SECRET), SECRET, 3600) == "alice"


def test_a_token_signed_with_another_secret_is_forged() -> None:
    assert reason(make_token(USER, "another-secret-" + "y" * 40)) == "forged"


def test_a_token_whose_user_was_changed_is_forged() -> None:
    token = make_token(USER, SECRET)
    payload, rest = token.split(".", 1)
    other = make_token(ObjectId(), SECRET).split(".", 1)[0]
    assert other != payload
    assert reason(f"{other}.{rest}") == "forged"
    assert reason("not-a-token") == "forged"
    assert reason(token[:-2]) == "forged"


def test_an_old_token_is_expired() -> None:
    old = make_token(USER, SECRET, issued_at=int(time.time()) - 3700)
    assert reason(old, max_age=3600) == "expired"
    assert read_token(old, SECRET, 7200) == str(USER)  # the same token, a longer TTL: accepted


@pytest.mark.parametrize("token", [None, "", 42, {"token": "x"}])
def test_no_token_is_missing(token: object) -> None:
    assert reason(token) == "missing"


@pytest.mark.parametrize(
    ("auth", "token"),
    [({"token": "abc"}, "abc"), ({}, None), (None, None), ("abc", None), (["abc"], None)],
)
def test_the_token_is_read_from_auth_only(auth: Any, token: object) -> None:
    assert token_of(auth) == token


def test_a_refusal_says_why_without_the_token() -> None:
    token = make_token(USER, "another-secret-" + "y" * 40)
    with pytest.raises(InvalidToken) as refused:
        read_token(token, SECRET, 60)
    assert str(refused.value) == "forged token"


def test_an_empty_or_huge_user_id_gets_no_token() -> None:
    with pytest.raises(ValueError, match="user id"):
        make_token("", SECRET)
    with pytest.raises(ValueError, match="user id"):
        make_token("u" * 201, SECRET)


# Rooms and payloads ------------------------------------------------------------------------------


def test_room_names_use_the_ids_string_form() -> None:
    assert user_room(USER) == "user:65f1a2b3c4d5e6f708192a3b"
    assert user_room("alice") == "user:alice"
    assert user_room(7) == "user:7"


def test_payloads_are_relaxed_extended_json_objects() -> None:
    post = {
        "_id": ObjectId("65f1a2b3c4d5e6f708192a3c"),
        "author_id": USER,
        "text": "Hello <b>world</b> ✓",
        "created_at": datetime(2026, 11, 24, 9, 30, 5, 123000, tzinfo=UTC),
        "likes": Int64(3),
        "price": Decimal128("9.99"),
    }
    payload = post_notification(post, event_id="82ABC", author_name="Ada")
    assert payload == {
        "post_id": "65f1a2b3c4d5e6f708192a3c",
        "event_id": "82ABC",
        "author_name": "Ada",
        "post": {
            "_id": {"$oid": "65f1a2b3c4d5e6f708192a3c"},
            "author_id": {"$oid": "65f1a2b3c4d5e6f708192a3b"},
            "text": "Hello <b>world</b> ✓",
            "created_at": {"$date": "2026-11-24T09:30:05.123Z"},
            "likes": 3,
            "price": {"$numberDecimal": "9.99"},
        },
    }
    assert json.loads(json.dumps(payload)) == payload  # plain JSON: what Socket.IO sends


def test_dates_outside_the_relaxed_range_stay_exact() -> None:
    assert to_json({"at": datetime(1960, 1, 1, tzinfo=UTC)}) == {
        "at": {"$date": {"$numberLong": "-315619200000"}}
    }


# Follower paging -----------------------------------------------------------------------------------


class Followers:
    """A fetch over `count` documents with _ids 1..count that records each call."""

    def __init__(self, count: int) -> None:
        self.docs = [{"_id": i, "follower_id": f"f{i}"} for i in range(1, count + 1)]
        self.calls: list[tuple[Any, int]] = []

    def __call__(self, after: Any, limit: int) -> list[dict[str, Any]]:
        self.calls.append((after, limit))
        return [d for d in self.docs if after is None or d["_id"] > after][:limit]


def test_followers_are_read_in_pages_after_the_last_id() -> None:
    fetch = Followers(5)
    result = [[d["_id"] for d in page] for page in pages(fetch, 2)]
    assert result == [[1, 2], [3, 4], [5]]
    assert fetch.calls == [(None, 2), (2, 2), (4, 2)]  # a short page is the last: no further query


def test_an_exact_multiple_ends_with_one_empty_query_and_no_empty_page() -> None:
    fetch = Followers(4)
    assert [len(page) for page in pages(fetch, 2)] == [2, 2]
    assert fetch.calls == [(None, 2), (2, 2), (4, 2)]


def test_no_followers_no_pages() -> None:
    fetch = Followers(0)
    assert list(pages(fetch, 500)) == []
    assert fetch.calls == [(None, 500)]


# Settings ----------------------------------------------------------------------------------------


def test_the_realtime_redis_defaults_to_redis_url() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://h:6379/1"})
    assert settings.realtime_redis_url == "redis://h:6379/1"
    assert (
        Settings.from_env({"REALTIME_REDIS_URL": "redis://rt:6379/2"}).realtime_redis_url
        == "redis://rt:6379/2"
    )


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"REALTIME_PORT": "70000"}, "REALTIME_PORT must be between 0 and 65535"),
        ({"REALTIME_DEMO": "2"}, "REALTIME_DEMO must be between 0 and 1"),
        ({"REALTIME_TOKEN_TTL": "0"}, "REALTIME_TOKEN_TTL must be at least 1"),
        ({"REALTIME_FOLLOWER_BATCH_SIZE": "0"}, "REALTIME_FOLLOWER_BATCH_SIZE must be at least 1"),
        ({"REALTIME_REDIS_URL": "http://:pw@h/"}, "REALTIME_REDIS_URL must be a URL starting with redis://"),
        ({"REALTIME_CHANNEL": " "}, "REALTIME_CHANNEL must not be empty"),
        ({"REALTIME_HOST": "a b"}, "REALTIME_HOST must be a host name or address"),
    ],
)
def test_bad_realtime_settings_are_refused_naming_the_variable(env: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(env)
    assert says in str(refused.value)
    assert "pw" not in str(refused.value)


def test_the_gateway_needs_a_long_enough_secret_and_never_shows_it() -> None:
    assert realtime_secret_problems(Settings()) == [
        "REALTIME_SECRET must be set: the realtime gateway signs client tokens with it "
        "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
    ]
    short = realtime_secret_problems(Settings(realtime_secret="tooshort-secret"))
    assert len(short) == 1 and "REALTIME_SECRET is too short (15 characters): at least 32" in short[0]
    assert "tooshort-secret" not in short[0]
    settings = Settings(realtime_secret=SECRET)
    assert realtime_secret_problems(settings) == []
    assert SECRET not in repr(settings)


def test_scrub_hides_the_realtime_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALTIME_SECRET", SECRET)
    assert scrub(f"signing with {SECRET} failed") == f"signing with {MASK} failed"
