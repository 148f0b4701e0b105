"""TASK_RETRY_FOR_SECONDS (the retry budget, a span of time) and TASK_MAX_RETRIES (an optional cap)."""

from __future__ import annotations

import pytest

from changeflow.worker.settings import Settings, SettingsError


def test_the_budget_is_an_hour_and_no_count_cap_by_default() -> None:
    settings = Settings.from_env({})
    assert settings.task_retry_for_seconds >= 3600
    assert settings.task_max_retries is None


def test_both_are_read_from_the_environment() -> None:
    settings = Settings.from_env({"TASK_RETRY_FOR_SECONDS": "7200", "TASK_MAX_RETRIES": "8"})
    assert (settings.task_retry_for_seconds, settings.task_max_retries) == (7200, 8)
    assert Settings.from_env({"TASK_MAX_RETRIES": ""}).task_max_retries is None  # empty: unset


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TASK_RETRY_FOR_SECONDS": "0"}, "TASK_RETRY_FOR_SECONDS must be at least 1"),
        ({"TASK_RETRY_FOR_SECONDS": "an hour"}, "TASK_RETRY_FOR_SECONDS must be an integer"),
        ({"TASK_MAX_RETRIES": "many"}, "TASK_MAX_RETRIES must be an integer"),
        ({"TASK_MAX_RETRIES": "-1"}, "TASK_MAX_RETRIES must not be negative"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)
