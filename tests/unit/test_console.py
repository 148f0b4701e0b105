"""The console's pure parts: basic auth, CSRF tokens and Origin check, dead-letter filters, ages, and
the settings it reads (CONSOLE_PASSWORD rules, FLOWER_URL)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from changeflow.console.auth import authorized, challenge, credentials
from changeflow.console.csrf import CsrfTokens, same_origin
from changeflow.console.filters import DEFAULT_LIMIT, parse_filter, selected_ids
from changeflow.console.status import StreamStatus, age_seconds, age_text, headroom_text
from changeflow.worker.settings import Settings, SettingsError, console_password_problems, scrub


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- auth -----------------------------------------------------------------------------------------


def test_credentials_are_read_from_a_basic_header() -> None:
    assert credentials(basic("ops", "s3:cret")) == ("ops", "s3:cret")  # a colon in the password stays
    assert credentials(basic("ops", "pässwörd")) == ("ops", "pässwörd")
    assert credentials("basic " + base64.b64encode(b"a:b").decode()) == ("a", "b")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer abc",
        "Basic",
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
    ],
)
def test_malformed_headers_give_no_credentials(header: str | None) -> None:
    assert credentials(header) is None
    assert not authorized(header, "ops", "secret")


def test_only_the_right_user_and_password_pass() -> None:
    assert authorized(basic("ops", "secret"), "ops", "secret")
    assert not authorized(basic("ops", "wrong"), "ops", "secret")
    assert not authorized(basic("other", "secret"), "ops", "secret")
    assert not authorized(basic("ops", "secret "), "ops", "secret")
    assert not authorized(basic("ops", ""), "ops", "secret")


def test_the_challenge_names_the_realm_not_the_user() -> None:
    [(name, value)] = challenge().items()
    assert name == "WWW-Authenticate" and value.startswith('Basic realm="changeflow console"')


# -- CSRF -----------------------------------------------------------------------------------------


def test_a_form_token_passes_with_its_own_cookie_only() -> None:
    tokens = CsrfTokens(b"k" * 32)
    token, cookie = tokens.new()
    assert tokens.token_of(cookie) == token
    assert tokens.valid(cookie, token)
    other_token, other_cookie = tokens.new()
    assert other_token != token
    assert not tokens.valid(cookie, other_token)
    assert not tokens.valid(other_cookie, token)
    assert not tokens.valid(cookie, None)
    assert not tokens.valid(None, token)
    assert not tokens.valid(cookie, "")


def test_a_cookie_signed_with_another_key_or_altered_is_refused() -> None:
    ours, theirs = CsrfTokens(b"k" * 32), CsrfTokens(b"x" * 32)
    token, forged = theirs.new()
    assert ours.token_of(forged) is None and not ours.valid(forged, token)
    token, cookie = ours.new()
    tampered = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
    assert not ours.valid(tampered, token)


@pytest.mark.parametrize(
    ("origin", "host", "expected"),
    [
        (None, "127.0.0.1:8100", True),
        ("http://127.0.0.1:8100", "127.0.0.1:8100", True),
        ("http://127.0.0.1:8100/", "127.0.0.1:8100", True),
        ("https://127.0.0.1:8100", "127.0.0.1:8100", False),  # another scheme is another origin
        ("http://evil.example", "127.0.0.1:8100", False),
        ("http://127.0.0.1:9999", "127.0.0.1:8100", False),
        ("null", "127.0.0.1:8100", False),  # sandboxed frames, file: pages
        ("http://127.0.0.1:8100", None, False),
    ],
)
def test_origin_check(origin: str | None, host: str | None, expected: bool) -> None:
    assert same_origin(origin, "http", host) is expected


# -- filters --------------------------------------------------------------------------------------


def test_a_filter_becomes_the_cli_query() -> None:
    chosen = parse_filter({"task": " tasks.send_welcome_email ", "reason": "permanent"})
    assert chosen.query() == {"task": "tasks.send_welcome_email", "reason": "permanent"}
    assert chosen.active and not chosen.problems and chosen.limit == DEFAULT_LIMIT
    assert parse_filter({}).query() == {} and not parse_filter({"task": "", "reason": ""}).active


def test_bad_filter_values_are_dropped_and_named() -> None:
    chosen = parse_filter({"reason": "$where", "limit": "0", "task": "x" * 500})
    assert chosen.query() == {}
    assert chosen.limit == DEFAULT_LIMIT
    assert [p.split(":")[0] for p in chosen.problems] == ["task", "reason", "limit"]
    assert parse_filter({"limit": "ten"}).problems == ["limit: a number from 1 to 1000"]
    assert parse_filter({"limit": "20"}).limit == 20


def test_selected_ids_drop_blanks_and_repeats() -> None:
    assert selected_ids(["b", "", " a ", "b", "  "]) == ["b", "a"]
    assert selected_ids([str(n) for n in range(10)], max_ids=3) == ["0", "1", "2"]


# -- status helpers -------------------------------------------------------------------------------


def test_ages_read_naturally() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert age_text(age_seconds(now - timedelta(seconds=4.25), now)) == "4.2s"
    assert (
        age_text(age_seconds((now - timedelta(minutes=3, seconds=5)).replace(tzinfo=None), now)) == "3m 05s"
    )
    assert age_text(7 * 3600 + 120) == "7h 02m"
    assert age_text(3 * 86400 + 4 * 3600) == "3d 4h"
    assert age_text(None) == "never"
    assert age_seconds(now + timedelta(seconds=5), now) == 0.0  # a clock ahead is not a negative age


def test_headroom_is_what_the_queue_takes_before_the_listener_pauses() -> None:
    status = StreamStatus(stream="s", now=datetime.now(UTC), health_file="f", queue_limit=100)
    assert status.headroom is None
    status.queue_length = 30
    assert status.headroom == 70
    status.queue_length = 130
    assert status.headroom == 0
    status.queue_limit = 0
    assert status.headroom is None


# -- settings -------------------------------------------------------------------------------------


def test_no_password_is_refused_off_loopback_and_the_message_names_the_setting() -> None:
    settings = Settings.from_env({})
    assert console_password_problems(settings, "127.0.0.1") == []
    [problem] = console_password_problems(settings, "0.0.0.0")
    assert problem.startswith("CONSOLE_PASSWORD must be set")
    with_password = Settings.from_env({"CONSOLE_PASSWORD": "hunter2-but-longer"})
    assert console_password_problems(with_password, "0.0.0.0") == []


def test_the_password_stays_out_of_repr_and_scrubbed_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSOLE_PASSWORD", "correct-horse-battery")
    settings = Settings.from_env()
    assert "correct-horse-battery" not in repr(settings)
    assert scrub("login with correct-horse-battery failed") == "login with **** failed"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FLOWER_URL": "javascript:alert(1)"}, "FLOWER_URL"),
        ({"FLOWER_URL": "flower:5555"}, "FLOWER_URL"),
        ({"CONSOLE_USER": "a:b"}, "CONSOLE_USER"),
        ({"CONSOLE_PORT": "70000"}, "CONSOLE_PORT"),
        ({"CONSOLE_HOST": "a b"}, "CONSOLE_HOST"),
    ],
)
def test_bad_console_settings_are_refused(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_a_flower_url_is_accepted() -> None:
    assert Settings.from_env({"FLOWER_URL": "http://127.0.0.1:5555/"}).flower_url == "http://127.0.0.1:5555/"


def test_oplog_headroom_is_the_checkpoint_time_minus_the_oldest_entry() -> None:
    oldest = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert headroom_text(oldest + timedelta(minutes=3, seconds=5), oldest) == "3m 05s"
    assert headroom_text((oldest + timedelta(hours=2)).replace(tzinfo=None), oldest) == "2h 00m"
    assert headroom_text(None, oldest) is None and headroom_text(oldest, None) is None
    fallen = headroom_text(oldest - timedelta(seconds=1), oldest)
    assert fallen is not None and fallen.startswith("none: ")
