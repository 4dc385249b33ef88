"""The Prometheus exporter, the alerting rules and the Grafana dashboard, without Ray.

The rules and the dashboard are only useful if every metric they name is one hybridray
exports: a renamed metric would silently turn an alert off. So they are parsed here and
every series name they use is checked against ``hybridray.metrics.EXPORTED`` (which in turn
is checked against what ``hybridray/serve/metrics.py`` really registers).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from hybridray import metrics as M
from tests.paths import ROOT

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "hybridray.json"
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
BUILTIN = {"up"}   # Prometheus's own per-target series


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression reads (functions, keywords and labels removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    names = set()
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr):
        if m.group(2) is None and m.group(1) not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def test_metric_names_finds_series_and_skips_functions_and_labels():
    expr = ('histogram_quantile(0.99, sum by (le, site) (rate(a_bucket{site=~"x|y"}[5m]))) '
            '> on (cluster) b_total and c')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_alert_rules_parse_and_name_only_exported_metrics():
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert len(rules) >= 6
    used: set[str] = set()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["alert"].startswith("Hybridray") and rule["labels"]["severity"] in (
            "warning", "critical")
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = names - M.EXPORTED - BUILTIN
        assert not unknown, f"{rule['alert']} reads metrics nobody exports: {unknown}"
        used |= names
    # what an operator must hear about: a site gone, errors, latency, spend
    assert {"hybridray_site_up", "ray_hybridray_serve_requests_total",
            "ray_hybridray_serve_request_latency_ms_bucket", "hybridray_accrued_cost_dollars",
            "hybridray_budget_dollars"} <= used


def test_prometheus_config_loads_the_rules_and_scrapes_the_exporter():
    doc = yaml.safe_load(PROMETHEUS.read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"] for j in doc["scrape_configs"]}
    assert {"hybridray", "ray"} <= jobs


def test_grafana_dashboard_reads_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = set().union(*(metric_names(e) for e in exprs))
    assert not used - M.EXPORTED, used - M.EXPORTED
    # the four the issue names: bytes by link, decisions, accrued cost, latency by site
    assert {"hybridray_cross_site_bytes_total", "hybridray_placement_decisions_total",
            "hybridray_accrued_cost_dollars",
            "ray_hybridray_serve_request_latency_ms_bucket"} <= used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_serve_metric_names_match_what_serving_registers(monkeypatch):
    """``EXPORTED`` lists Serve's metrics by hand; check it against the real registrations."""
    import ray.util.metrics as rum

    from hybridray.serve import metrics as serve_metrics

    seen: dict[str, str] = {}

    def fake(kind):
        class Fake:
            def __init__(self, name, description="", *args, **kwargs):
                seen[name] = kind
        return Fake

    monkeypatch.setattr(rum, "Counter", fake("counter"))
    monkeypatch.setattr(rum, "Gauge", fake("gauge"))
    monkeypatch.setattr(rum, "Histogram", fake("histogram"))
    serve_metrics.Metrics()
    assert seen == M._serve_metric_names()


# ---- the exporter on a recorded (not running) cluster ----------------------------------------

@pytest.fixture()
def recorded(tmp_path, monkeypatch):
    from tests.recorded import make_recorded

    monkeypatch.setenv("HYBRIDRAY_HOME", str(tmp_path))
    return make_recorded(tmp_path)


def parse_exposition(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-z_:][a-z0-9_:]*)\{(.*)\} (\S+)', line)
        assert m, f"malformed sample line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def test_exporter_reports_sites_bytes_decisions_and_cost(recorded):
    text = M.render("m1", budget=25.0)
    s = parse_exposition(text)
    assert {name for name, _ in s} <= set(M.EXPORTER_METRICS)

    def get(name, **labels):
        return s[(name, frozenset({"cluster": "m1", **labels}.items()))]

    assert get("hybridray_cross_site_bytes_total", src="cloud-b", dst="onprem") == 3e9
    assert get("hybridray_egress_cost_dollars_total", src="cloud-b", dst="onprem") == \
        pytest.approx(0.36)
    assert get("hybridray_placement_decisions_total", site="onprem", kind="train",
               outcome="placed") == 1
    assert get("hybridray_placement_decisions_total", site="none", kind="data",
               outcome="refused") == 1
    assert get("hybridray_site_up", site="cloud-a", kind="cloud") == 1
    assert get("hybridray_site_up", site="onprem", kind="onprem") == 0     # the head is gone
    assert get("hybridray_cost_rate_dollars_per_hour", site="cloud-a", kind="cloud") == 0.34
    assert get("hybridray_accrued_cost_dollars", site="cloud-b", kind="egress") == \
        pytest.approx(0.36)
    assert get("hybridray_accrued_cost_dollars", site="cloud-a", kind="compute") > 0
    assert get("hybridray_budget_dollars") == 25.0
    assert get("hybridray_trainings_running") == 1
    assert "# TYPE hybridray_cross_site_bytes_total counter" in text


def test_exporter_serves_http_and_refuses_other_paths(recorded):
    import urllib.error
    import urllib.request

    server = M.serve_exporter("m1", port=0)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200 and "version=0.0.4" in r.headers["Content-Type"]
            assert b"hybridray_site_up" in r.read()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
        assert e.value.code == 404
    finally:
        server.shutdown()


def test_cli_metrics_names_an_unknown_cluster_without_a_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hybridray", "metrics", "nope", "--once"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "HYBRIDRAY_HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert "no cluster named 'nope'" in proc.stderr and "Traceback" not in proc.stderr
