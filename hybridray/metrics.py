"""Prometheus metrics only hybridray knows, beside Ray's own: sites, bytes, decisions, cost.

Ray's metrics agents already export Ray's metrics and, from Serve replicas and ingresses,
hybridray's serving metrics (``ray_hybridray_serve_*``: requests, latency by site, replicas,
failovers; see ``hybridray/serve/metrics.py``). What lives outside any Ray process — the
audit log's cross-site bytes and placement decisions, the topology's prices, whether a site
has a live node — is exported here, by a small HTTP exporter::

    hybridray metrics local --port 9464 --budget 50       # serves /metrics
    hybridray metrics local --once                        # prints one scrape

``deploy/prometheus/`` scrapes both and holds the alerting rules; ``deploy/grafana/`` the
dashboard. ``EXPORTED`` lists every metric name Prometheus can see from hybridray (the alert
rules' test checks every name they use against it).
"""

from __future__ import annotations

import os
import threading
from typing import Any

#: name -> (type, help) of every metric this exporter serves
EXPORTER_METRICS: dict[str, tuple[str, str]] = {
    "hybridray_site_up": ("gauge", "1 while the site has at least one running node."),
    "hybridray_site_nodes": ("gauge", "Recorded nodes per site."),
    "hybridray_site_nodes_running": ("gauge", "Nodes per site whose process runs and that "
                                              "the GCS sees alive."),
    "hybridray_site_cpus": ("gauge", "Logical CPUs of running nodes per site."),
    "hybridray_site_cpus_used": ("gauge", "Logical CPUs in use per site."),
    "hybridray_cost_rate_dollars_per_hour": ("gauge", "Price per hour of the running nodes "
                                                      "per site (topology prices)."),
    "hybridray_accrued_cost_dollars": ("gauge", "Cost accrued since up per site and kind "
                                                "(compute: node-hours x price; egress)."),
    "hybridray_budget_dollars": ("gauge", "The spend budget given to the exporter "
                                          "(--budget); absent without one."),
    "hybridray_cross_site_bytes_total": ("counter", "Bytes sent between sites, from the "
                                                    "audit log."),
    "hybridray_egress_cost_dollars_total": ("counter", "Egress charged for cross-site bytes."),
    "hybridray_placement_decisions_total": ("counter", "Placement decisions by first site, "
                                                       "workload kind and outcome."),
    "hybridray_trainings_running": ("gauge", "Training runs started and not yet ended."),
    "hybridray_pool_nodes_running": ("gauge", "Running nodes per pool, static or elastic "
                                              "(elastic: launched by Ray's autoscaler)."),
    "hybridray_pool_max_nodes": ("gauge", "The most nodes a pool may have (its count, or max "
                                          "for an elastic pool)."),
    "hybridray_node_seconds_total": ("counter", "Node-seconds actually up since up, per site "
                                                "(what compute cost accrues on)."),
    "hybridray_autoscaler_pending_launches": ("gauge", "Nodes Ray's autoscaler has asked the "
                                                       "provider for and not yet running, "
                                                       "per node type."),
}


def _serve_metric_names() -> dict[str, str]:
    """The serving metrics Ray exports for hybridray (name without Ray's prefix -> type)."""
    return {"hybridray_serve_requests": "counter",
            "hybridray_serve_request_latency_ms": "histogram",
            "hybridray_serve_tokens": "counter",
            "hybridray_serve_batch_size": "histogram",
            "hybridray_serve_replicas": "gauge",
            "hybridray_serve_failovers": "counter",
            "hybridray_serve_rejected": "counter"}


def exported_names() -> set[str]:
    """Every series name Prometheus sees from hybridray (both sources, with suffixes)."""
    names = set(EXPORTER_METRICS)
    for name, kind in _serve_metric_names().items():
        full = f"ray_{name}"
        if kind == "counter":
            names |= {full, f"{full}_total"}
        elif kind == "histogram":
            names |= {f"{full}_bucket", f"{full}_sum", f"{full}_count"}
        else:
            names.add(full)
    return names


#: every series name hybridray exports (exporter + Serve metrics through Ray)
EXPORTED = frozenset(exported_names())


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _line(name: str, labels: dict[str, Any], value: float) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {float(value):.10g}"


def collect(name: str, *, home: str | os.PathLike | None = None,
            budget: float | None = None) -> list[tuple[str, dict[str, Any], float]]:
    """One scrape of cluster ``name``: ``(metric, labels, value)`` samples.

    Raises:
        ClusterNotFound: nothing is recorded under ``name``.
    """
    from hybridray.cluster.activity import activity
    from hybridray.cluster.status import status

    report = status(name, home=home)
    act = activity(name, home=home, report=report)
    c = {"cluster": name}
    out: list[tuple[str, dict[str, Any], float]] = []
    for site, s in report["sites"].items():
        lab = {**c, "site": site, "kind": s["kind"] or "unknown"}
        out += [("hybridray_site_up", lab, 1.0 if s["alive"] else 0.0),
                ("hybridray_site_nodes", lab, s["nodes"]),
                ("hybridray_site_nodes_running", lab, s["alive"]),
                ("hybridray_site_cpus", lab, s["cpus_total"]),
                ("hybridray_site_cpus_used", lab, s["cpus_used"]),
                ("hybridray_cost_rate_dollars_per_hour", lab, s["price_per_hour"])]
    for site, s in report["sites"].items():
        for pool, p in s.get("pools", {}).items():
            lab = {**c, "site": site, "pool": pool, "elastic": str(p["elastic"]).lower()}
            out += [("hybridray_pool_nodes_running", lab, p["running"]),
                    ("hybridray_pool_max_nodes", lab, p["max"])]
    for site, v in act["cost"].items():
        out.append(("hybridray_node_seconds_total", {**c, "site": site},
                    v.get("node_seconds", 0.0)))
        for kind in ("compute", "egress"):
            out.append(("hybridray_accrued_cost_dollars", {**c, "site": site, "kind": kind},
                        v[kind]))
    if budget is not None:
        out.append(("hybridray_budget_dollars", c, budget))
    scaler = report.get("autoscaler")
    if scaler is not None:
        pending: dict[str, int] = {}
        for r in scaler["pending_launches"]:
            pending[r["node_type"]] = pending.get(r["node_type"], 0) + r["count"]
        for i in scaler["pending_instances"]:
            pending[i["node_type"]] = pending.get(i["node_type"], 0) + 1
        for node_type in report.get("node_types", []):
            out.append(("hybridray_autoscaler_pending_launches",
                        {**c, "node_type": node_type}, pending.get(node_type, 0)))
    for b in act["bytes"]:
        lab = {**c, "src": b["src"], "dst": b["dst"]}
        out += [("hybridray_cross_site_bytes_total", lab, b["bytes"]),
                ("hybridray_egress_cost_dollars_total", lab, b["cost"])]
    for d in act["decisions"]:
        out.append(("hybridray_placement_decisions_total",
                    {**c, "site": d["site"], "kind": d["kind"], "outcome": d["outcome"]},
                    d["count"]))
    out.append(("hybridray_trainings_running", c, len(act["trainings"])))
    return out


def render(name: str, *, home: str | os.PathLike | None = None,
           budget: float | None = None) -> str:
    """The Prometheus text exposition (format 0.0.4) of one scrape."""
    samples = collect(name, home=home, budget=budget)
    lines: list[str] = []
    for metric, (kind, help_text) in EXPORTER_METRICS.items():
        mine = [s for s in samples if s[0] == metric]
        if not mine:
            continue
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        lines += [_line(metric, labels, value) for _, labels, value in mine]
    return "\n".join(lines) + "\n"


def serve_exporter(name: str, *, host: str = "127.0.0.1", port: int = 9464,
                   home: str | os.PathLike | None = None, budget: float | None = None):
    """Start an HTTP server answering ``GET /metrics``; returns it (``shutdown()`` to stop)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics here")
                return
            try:
                body, code = render(name, home=home, budget=budget).encode(), 200
            except Exception as e:  # a scrape error is a 500 with the reason, never a crash
                body, code = f"# scrape failed: {type(e).__name__}: {e}\n".encode(), 500
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server
