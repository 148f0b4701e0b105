"""What the dead-letter page's query string selects: read into `letter_filter` arguments, checked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from changeflow.listener.dead_letters import REASONS, letter_filter

MAX_TASK_LENGTH = 200
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass(frozen=True)
class LetterFilter:
    task: str | None = None
    reason: str | None = None
    limit: int = DEFAULT_LIMIT
    problems: list[str] = field(default_factory=list)

    def query(self) -> dict[str, Any]:
        """The MongoDB query of the CLI's `list --task --reason`."""
        return letter_filter(task=self.task, reason=self.reason)

    @property
    def active(self) -> bool:
        return self.task is not None or self.reason is not None


def parse_filter(params: Mapping[str, str]) -> LetterFilter:
    """The filter `?task=&reason=&limit=` asks for; a bad value is left out and named in `problems`."""
    problems: list[str] = []
    task = (params.get("task") or "").strip() or None
    if task is not None and len(task) > MAX_TASK_LENGTH:
        problems.append(f"task: at most {MAX_TASK_LENGTH} characters")
        task = None
    reason = (params.get("reason") or "").strip() or None
    if reason is not None and reason not in REASONS:
        problems.append(f"reason: one of {', '.join(REASONS)}")
        reason = None
    limit = DEFAULT_LIMIT
    raw_limit = (params.get("limit") or "").strip()
    if raw_limit:
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIMIT:
            problems.append(f"limit: a number from 1 to {MAX_LIMIT}")
            limit = DEFAULT_LIMIT
    return LetterFilter(task=task, reason=reason, limit=limit, problems=problems)


def selected_ids(values: list[str], max_ids: int = MAX_LIMIT) -> list[str]:
    """The letter ids a form selected: non-empty, de-duplicated, in order, at most `max_ids`."""
    ids = list(dict.fromkeys(v.strip() for v in values if v and v.strip()))
    return ids[:max_ids]
