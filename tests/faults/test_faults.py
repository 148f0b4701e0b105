"""The fault suite under pytest: one test per scenario, each asserting that scenario's expectations.

    python -m pytest -m faults          # all of them, several minutes; the table is printed at the end
    python -m pytest -m faults -k broker

A scenario whose listener feature is missing (tests/faults/features.py) is xfail(strict=True) with the
name of that feature; once the feature is there the mark goes away on its own.
"""

from __future__ import annotations

import os

import pytest

from tests.faults.features import missing_feature
from tests.faults.result import Result
from tests.faults.scenarios import SCENARIOS, Options, Scenario, run_scenario

pytestmark = pytest.mark.faults

SEED = int(os.environ.get("CHANGEFLOW_FAULTS_SEED", "4"))


def _param(scenario: Scenario) -> object:
    reason = missing_feature(scenario.number)
    marks = [pytest.mark.xfail(strict=True, reason=f"feature missing: {reason}")] if reason else []
    slug = scenario.run.__name__
    return pytest.param(scenario, id=f"{scenario.number}-{slug}", marks=marks)


@pytest.mark.parametrize("scenario", [_param(s) for s in SCENARIOS])
def test_fault_scenario(
    scenario: Scenario, fault_results: list[Result], tmp_path_factory: pytest.TempPathFactory
) -> None:
    options = Options(seed=SEED, log_root=tmp_path_factory.mktemp("faults"))
    result = run_scenario(scenario, options)
    fault_results.append(result)
    assert result.passed, result.report()
