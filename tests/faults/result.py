"""One scenario's outcome: the table row, the expectations it was checked against, and the table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = (
    "#",
    "scenario",
    "events written",
    "effects expected",
    "effects observed",
    "lost",
    "doubled DB effects",
    "doubled emails",
    "dead letters",
    "time to recover",
    "result",
)


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class Result:
    number: int
    title: str
    events: int = 0
    expected: int = 0
    observed: int = 0
    lost: int = 0
    doubled_db: int = 0
    doubled_emails: int = 0
    dead_letters: int = 0
    recover_seconds: float | None = None
    elapsed: float = 0.0
    notes: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    error: str | None = None  # the scenario could not run to its end
    xfail: str | None = None  # the feature it needs is missing (see tests/faults/features.py)
    log_dir: Path | None = None
    logs: str = ""

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(what, bool(ok), detail))
        return bool(ok)

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def verdict(self) -> str:
        if self.passed:
            return "pass"
        return "XFAIL (feature missing)" if self.xfail else "FAIL"

    def failures(self) -> list[str]:
        failed = [f"{c.what}: {c.detail}" if c.detail else c.what for c in self.checks if not c.ok]
        if self.error:
            failed.append(f"error: {self.error}")
        return failed

    def report(self) -> str:
        """Everything needed to see why a scenario failed: the row, the failed checks, the logs."""
        lines = [format_table([self]), ""]
        lines += [f"FAILED: {failure}" for failure in self.failures()]
        lines += [f"note: {note}" for note in self.notes]
        if self.xfail:
            lines.append(f"feature missing: {self.xfail}")
        if self.log_dir is not None:
            lines.append(f"logs: {self.log_dir}")
        if self.logs:
            lines += ["", self.logs]
        return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "not recovered" if value is None else f"{value:.1f} s"


def row(result: Result) -> list[str]:
    return [
        str(result.number),
        result.title,
        str(result.events),
        str(result.expected),
        str(result.observed),
        str(result.lost),
        str(result.doubled_db),
        str(result.doubled_emails),
        str(result.dead_letters),
        _seconds(result.recover_seconds),
        result.verdict,
    ]


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table, one row per scenario (readable as plain text too)."""
    rows = [list(COLUMNS)] + [row(r) for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    numeric = set(range(2, 10))

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    dashes = ["-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)]
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def format_notes(results: Sequence[Result]) -> str:
    lines: list[str] = []
    for result in results:
        for note in result.notes:
            lines.append(f"- {result.number}: {note}")
        for failure in result.failures():
            lines.append(f"- {result.number}: FAILED {failure}")
        if result.xfail:
            lines.append(f"- {result.number}: feature missing: {result.xfail}")
    return "\n".join(lines)
