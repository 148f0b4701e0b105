"""The alert rules (promtool), Prometheus's scrape configuration, and the names that the alert rules
and the Grafana dashboard use: only metrics the code defines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pymongo.database import Database

from changeflow.listener.metrics import METRIC_NAMES as LISTENER_METRICS
from changeflow.listener.metrics import ListenerMetrics
from changeflow.worker.metrics import METRIC_NAMES as WORKER_METRICS
from changeflow.worker.metrics import TaskMetrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "changeflow.json"
NAME = re.compile(r"\bchangeflow_[a-z0-9_]+")
# The names the operations contract promises (README, "Operations").
CONTRACT = {
    "changeflow_listener_events_total",
    "changeflow_listener_tasks_published_total",
    "changeflow_listener_publish_seconds",
    "changeflow_listener_lag_seconds",
    "changeflow_listener_checkpoint_age_seconds",
    "changeflow_listener_oplog_headroom_seconds",
    "changeflow_listener_active",
    "changeflow_task_outcomes_total",
    "changeflow_task_duration_seconds",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install Debian's prometheus package (scripts/install.sh does)")
    return path


def test_alert_rules_fire_and_stay_quiet_as_their_tests_say() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_test_that_fires_it_and_one_that_does_not() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert alerts == {
        "ChangeflowNoActiveListener", "ChangeflowStreamStalled", "ChangeflowListenerLagHigh",
        "ChangeflowOplogHeadroomLow", "ChangeflowDeadLettersGrowing",
    }  # fmt: skip
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in cases for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in cases for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert fired == alerts and quiet == alerts


def test_scrape_configuration_is_valid() -> None:
    result = subprocess.run(
        [promtool(), "check", "config", "prometheus.yml"], cwd=PROMETHEUS, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def defined_samples(db: Database) -> set[str]:
    """Every sample name the listener's and the workers' metrics expose (_bucket, _sum, ... included),
    the listener's as the active one shows them with a checkpoint, reading the oplog from `db`."""
    registry = CollectorRegistry()
    listener = ListenerMetrics("changeflow", registry, db=db)
    listener.holds_lease(lambda: True)
    listener.checkpoint(datetime.now(UTC))
    for metric in (listener.events, listener.tasks, listener.dead_letters):
        metric.labels(*["x"] * len(metric._labelnames))  # a child, so that its samples show
    text = generate_latest(registry).decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    worker = TaskMetrics()
    for metric in (worker.outcomes, worker.duration, worker.dead_letters):
        metric.labels(*["x"] * len(metric._labelnames))
        names |= {sample.name for family in metric.collect() for sample in family.samples}
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_code_defines_the_contract_names(db: Database) -> None:
    assert set(LISTENER_METRICS) | set(WORKER_METRICS) >= CONTRACT
    samples = defined_samples(db)
    families = {re.sub(r"_(bucket|sum|count|created)$", "", name) for name in samples}
    assert set(LISTENER_METRICS) | set(WORKER_METRICS) <= samples | families


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_exprs_name_only_metrics_the_code_defines(source: str, db: Database) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    defined = set(LISTENER_METRICS) | set(WORKER_METRICS) | defined_samples(db)
    used = {name for expr in exprs for name in NAME.findall(expr)}
    assert exprs and all(NAME.search(expr) for expr in exprs), "an expr that names no changeflow metric"
    assert used - defined == set(), f"{source} names metrics the code does not define"


def test_the_dashboard_shows_every_metric() -> None:
    used = {name for expr in dashboard_exprs() for name in NAME.findall(expr)}
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert set(LISTENER_METRICS) | set(WORKER_METRICS) <= shown
