"""Prometheus configuration, recording and alert rules, checked by the real promtool:
`check config`, `check rules`, the rule unit tests, one firing and one quiet test per alert,
and every metric the rules read is one the gateway really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from slsg_gateway.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
REQUIRED_ALERTS = {"SLSGGatewayDown", "TritonNotReady", "SLSGHighErrorRatio", "SLSGLatencyP95OverBudget",
                   "SLSGAnomalyRateJump", "SLSGReviewBacklogGrowing"}
GATEWAY_METRIC = re.compile(r"(?<![\w:])slsg_[a-z0-9_]+(?![\w:])")  # not inside recorded names


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    """Run the real promtool (Debian package `prometheus`); skip only when it is not installed."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not found: apt-get install -y prometheus (Debian/Ubuntu) provides it")
    return subprocess.run([binary, *map(str, args)], capture_output=True, text=True, timeout=60)


def rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def gateway_series_names() -> set[str]:
    """Every sample name the gateway's registry can expose (counter _total, histogram parts, ...)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in GatewayMetrics().registry.collect()
            for suffix in suffixes[family.type]}


def test_config_is_valid_and_finds_the_rule_files():
    result = promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # rule_files are relative to the config file; both files must have been found and checked
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout, result.stdout
    assert len(RULE_FILES) == 2


def test_rule_files_are_valid():
    result = promtool("check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass():
    assert RULE_TESTS, "no promtool unit tests in docker/prometheus/tests"
    result = promtool("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert REQUIRED_ALERTS <= alerts
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - firing == set(), f"alerts without a firing unit test: {sorted(alerts - firing)}"
    assert alerts - quiet == set(), f"alerts without a non-firing unit test: {sorted(alerts - quiet)}"


def test_unit_tests_catch_a_changed_threshold(tmp_path):
    """The unit tests are sharp: moving the latency budget from 250 ms to 600 ms must fail them."""
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, copy)
    alerts = copy / "rules" / "slsg_alerts.yml"
    text = alerts.read_text()
    assert 'stage="total"} > 0.25' in text
    alerts.write_text(text.replace('stage="total"} > 0.25', 'stage="total"} > 0.6'))
    result = promtool("test", "rules", *sorted((copy / "tests").glob("*.yml")))
    assert result.returncode != 0
    assert "SLSGLatencyP95OverBudget" in result.stdout + result.stderr


def test_rules_read_only_metrics_the_gateway_exports():
    exported = gateway_series_names()
    read = {name for r in rules() for name in GATEWAY_METRIC.findall(r["expr"])}
    assert read, "the rules read no gateway metric"
    assert read - exported == set(), f"rules read metrics the gateway does not export: {sorted(read - exported)}"


def test_alerts_use_only_recorded_series_that_exist():
    recorded = {r["record"] for r in rules() if "record" in r}
    used = {name for r in rules() if "alert" in r for name in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b",
                                                                          r["expr"])}
    assert used and used <= recorded, sorted(used - recorded)


def test_alerts_carry_severity_and_summary():
    for rule in (r for r in rules() if "alert" in r):
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
