"""Provisioned Grafana dashboards: structure, datasource wiring, and every PromQL expression
(panel targets and variable queries) parsed by the real promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from test_ops_prometheus import gateway_series_names

ROOT = Path(__file__).resolve().parents[2]
GRAFANA_DIR = ROOT / "docker" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
EXPECTED_DASHBOARDS = {"line-overview", "service-health", "model-versions"}
# Grafana variables -> what they stand for when the query runs (all models/lines, short windows)
VARIABLE_VALUES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$model": ".*", "$line": ".*"}
# Triton's metric names as documented (docs/user_guide/metrics.md), for queries on the nv_* series
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_pending_request_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us", "nv_gpu_utilization", "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes", "nv_gpu_power_usage",
}
_METRIC = re.compile(r"(?<![\w:])(?:slsg|nv)_[a-z0-9_]+(?![\w:])")  # not inside recorded names
_RECORDED = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def load_dashboards() -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in DASHBOARD_FILES}


def all_panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def substitute_variables(expr: str) -> str:
    for name in sorted(VARIABLE_VALUES, key=len, reverse=True):  # $__rate_interval before $__range...
        expr = expr.replace(name, VARIABLE_VALUES[name])
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard_queries() -> list[tuple[str, str, set[str]]]:
    """(where, PromQL, labels its legend shows) for every panel target and every variable's
    selector (whose label must exist), Grafana variables substituted."""
    out = []
    for name, dashboard in load_dashboards().items():
        for panel in all_panels(dashboard):
            for target in panel.get("targets", []):
                legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
                out.append((f"{name}/{panel['title']}/{target['refId']}", substitute_variables(target["expr"]),
                            legend))
        for var in dashboard["templating"]["list"]:
            match = _LABEL_VALUES.match(var["definition"])
            assert match, f"{name}: variable {var['name']} is not a label_values() query"
            out.append((f"{name}/${var['name']}", substitute_variables(match["selector"]), {match["label"]}))
    return out


def provisioned_datasource_uid() -> str:
    config = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = config["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    return source["uid"]


def promtool_check_expressions(queries: list[tuple], tmp_path: Path) -> subprocess.CompletedProcess:
    """Parse expressions with promtool's real PromQL parser: one recording rule per expression."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not found: apt-get install -y prometheus (Debian/Ubuntu) provides it")
    rules = [{"record": f"dashboard_query_{i}", "expr": expr} for i, (_, expr, *_) in enumerate(queries)]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    return subprocess.run([binary, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_the_three_dashboards_exist_with_unique_uids():
    dashboards = load_dashboards()
    assert set(dashboards) == EXPECTED_DASHBOARDS
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids)
    for d in dashboards.values():
        assert 36 <= d["schemaVersion"] <= 41 and d["title"].startswith("SLSG / ") and "slsg" in d["tags"]


def test_panels_and_variables_use_the_provisioned_datasource():
    uid = provisioned_datasource_uid()
    for name, dashboard in load_dashboards().items():
        for panel in all_panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, f"{name}/{panel['title']}"
            assert panel["targets"], f"{name}/{panel['title']} has no query"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid, f"{name}/{panel['title']}"
        for var in dashboard["templating"]["list"]:
            assert var["datasource"]["uid"] == uid, f"{name}: ${var['name']}"


def test_panel_layout_is_consistent():
    for name, dashboard in load_dashboards().items():
        panels = list(all_panels(dashboard))
        ids = [p["id"] for p in panels]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        cells: set[tuple[int, int]] = set()
        for p in panels:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{name}/{p['title']} is wider than the grid"
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & area, f"{name}/{p['title']} overlaps another panel"
            cells |= area
            refs = [t["refId"] for t in p.get("targets", [])]
            assert len(set(refs)) == len(refs), f"{name}/{p['title']}: duplicate refIds"


def test_dashboards_show_what_the_issue_asks_for():
    exprs = {name: " ".join(t["expr"] for p in all_panels(d) for t in p.get("targets", []))
             for name, d in load_dashboards().items()}
    types = {name: {p["type"] for p in all_panels(d)} for name, d in load_dashboards().items()}
    assert "heatmap" in types["line-overview"] and "slsg_score_bucket" in exprs["line-overview"]
    assert "model_line:slsg_anomaly_ratio:rate5m" in exprs["line-overview"]
    for triton_metric in ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"):
        assert triton_metric in exprs["service-health"]
    for gateway_metric in ("slsg_stage_seconds_bucket", "slsg_queue_depth", "slsg_batch_size_bucket",
                           "slsg_backend_errors_total"):
        assert gateway_metric in exprs["service-health"]
    assert "slsg_model_version_info" in exprs["model-versions"]


def test_every_dashboard_query_parses(tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 30
    result = promtool_check_expressions(queries, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_queries_read_only_exported_or_recorded_series():
    exported = gateway_series_names() | TRITON_METRICS
    recorded = {r["record"] for path in sorted((ROOT / "docker" / "prometheus" / "rules").glob("*.yml"))
                for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if "record" in r}
    exprs = [expr for _, expr, _ in dashboard_queries()]
    read = {name for expr in exprs for name in _METRIC.findall(expr)}
    used_records = {name for expr in exprs for name in _RECORDED.findall(expr)}
    assert read - exported == set(), f"unknown metrics: {sorted(read - exported)}"
    assert used_records and used_records - recorded == set(), f"not recorded: {sorted(used_records - recorded)}"


def test_selectors_match_the_gateway_metric_labels():
    """Label matchers on slsg_* metrics name labels the gateway really attaches to them."""
    from slsg_gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    labels = {}
    for metric in vars(metrics).values():
        if hasattr(metric, "_labelnames"):
            for suffix in ("", "_total", "_bucket", "_sum", "_count"):
                labels[metric._name + suffix] = {*metric._labelnames, "job", "instance"}
            labels[metric._name + "_bucket"].add("le")
    checked = 0
    for where, expr, _ in dashboard_queries():
        for name, matchers in re.findall(r"(?<![\w:])(slsg_\w+)\{([^}]*)\}", expr):
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            assert used <= labels[name], f"{where}: {name} has no label {sorted(used - labels[name])}"
            checked += 1
    assert checked >= 20


def test_the_parse_check_rejects_broken_promql(tmp_path):
    """The check above is a real parser: an unbalanced expression and an unknown function fail."""
    for broken in ('sum by (model) (rate(slsg_score_bucket[5m])', "histogram_quantil(0.5, slsg_score_bucket)"):
        result = promtool_check_expressions([("broken", broken)], tmp_path)
        assert result.returncode != 0, broken
        assert "could not parse expression" in result.stdout + result.stderr, result.stdout + result.stderr


def test_provisioning_points_at_the_mounted_dashboards():
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "slsg.yml").read_text())
    (entry,) = provider["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    assert mounts["./docker/grafana/dashboards"] == entry["options"]["path"]
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(entry["options"]["path"] + "/")
    assert (GRAFANA_DIR / "dashboards" / Path(home).name).is_file()
