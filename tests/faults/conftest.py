"""Collects each fault scenario's result and prints the table at the end of the pytest run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.result import Result, format_notes, format_table

_RESULTS: list[Result] = []


@pytest.fixture(scope="session")
def fault_results() -> Iterator[list[Result]]:
    yield _RESULTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _RESULTS:
        return
    results = sorted(_RESULTS, key=lambda r: r.number)
    terminalreporter.section("fault suite (issue 4)")
    terminalreporter.write_line(format_table(results))
    notes = format_notes(results)
    if notes:
        terminalreporter.write_line("")
        terminalreporter.write_line(notes)
