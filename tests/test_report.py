"""The demo report from recorded facts: costs, bytes, restricted work, files (no Ray)."""

from __future__ import annotations

import json

import pytest

from hybridray.report import facts as F
from hybridray.report import write_report


def facts(tmp_path):
    from hybridray.audit import AuditLog

    audit = AuditLog.for_cluster("r1", tmp_path)
    audit.transfer("cloud-b", "onprem", 3_000_000, 0.36, what="gradients (fp32, ring estimate)")
    audit.transfer("onprem", "cloud-a", 1_000, 0.0, sync_id="s1")
    audit.record("placement", workload="t", kind="train", data_class="restricted",
                 sites=["onprem"])
    audit.record("refusal", workload="x", kind="serve", data_class="restricted",
                 rule="residency", message="no")
    return {
        "name": "r1", "mode": "quick", "started_at": "now", "started_ts": 0, "duration_s": 7200,
        "down_at": 7200,
        "nodes": [{"key": "head", "site": "onprem", "pid": 1, "price_per_hour": 0.4, "up_at": 0},
                  {"key": "b", "site": "cloud-b", "pid": 2, "price_per_hour": 0.11, "up_at": 0}],
        "serving": {"killed": {"site": "cloud-b", "pid": 2, "at": 3600},
                    "services": {"lm": {"data_class": "restricted", "ingress_sites": ["onprem"],
                                        "replicas": [{"site": "onprem"}]}},
                    "load": {"marks": {"kill": 1.5}, "records": [
                        {"t": 0.5, "kind": "embedding", "latency_ms": 10, "status": 200,
                         "site": "cloud-b", "attempts": 1},
                        {"t": 2.5, "kind": "embedding", "latency_ms": 30, "status": 200,
                         "site": "cloud-a", "attempts": 2}]}},
        "training": {"run": "lm", "steps": 4, "data_class": "restricted", "precision": "bf16",
                     "worker_sites": ["onprem", "onprem"], "planned_sites": ["onprem"] * 2,
                     "initial_eval_loss": 5.0, "final_eval_loss": 3.0, "checkpoint": "c",
                     "eval_history": [[0, 5.0], [4, 3.0]],
                     "history": [{"step": 2, "loss": 4.0}, {"step": 4, "loss": 3.2}]},
        "steps": [{"name": "up", "seconds": 1, "outcome": "ok"}], "decisions": [],
    }


def test_cost_is_node_hours_times_price_until_down_or_the_kill_plus_egress(tmp_path):
    f = facts(tmp_path)
    write_report(f, tmp_path / "out", home=tmp_path)
    by_site = f["cost"]["by_site"]
    assert by_site["onprem"]["node_hours"] == 2.0 and by_site["onprem"]["compute"] == 0.8
    assert by_site["cloud-b"]["node_hours"] == 1.0                  # killed after an hour
    assert by_site["cloud-b"]["egress"] == 0.36
    assert f["cost"]["total"] == round(0.8 + 0.11 + 0.36, 6)


def test_report_files_bytes_audit_and_restricted_work(tmp_path):
    f = facts(tmp_path)
    paths = write_report(f, tmp_path / "out", home=tmp_path)
    assert {p.name for p in paths["plots"]} == {"training.png", "serving.png", "cost.png",
                                                "bytes.png"}
    on_disk = json.loads(paths["json"].read_text())
    assert on_disk["cross_site_bytes"][0] == {"src": "cloud-b", "dst": "onprem",
                                              "what": "gradients", "bytes": 3_000_000,
                                              "cost": 0.36}
    assert on_disk["cross_site_bytes"][1]["what"] == "dataset sync"
    assert on_disk["restricted_work"]["sites"] == ["onprem"]
    assert on_disk["audit"]["refusals"][0]["rule"] == "residency"
    assert on_disk["serving"]["latency"]["embedding@cloud-a"]["requests"] == 1
    md = paths["markdown"].read_text()
    assert "![training curve](training.png)" in md and "Restricted data stayed" in md


def test_restricted_work_names_a_cloud_site_if_one_was_used():
    f = {"training": {"data_class": "restricted", "worker_sites": ["onprem", "cloud-a"]}}
    assert F.restricted_work(f, [])["sites"] == ["cloud-a", "onprem"]


def test_a_demo_that_stopped_early_still_gets_a_report_that_says_so(tmp_path):
    partial = {"name": "r2", "mode": "full", "started_at": "now", "started_ts": 0,
               "error": "ClusterError: node cloud-b did not register", "duration_s": 3,
               "steps": [{"name": "1. up", "seconds": 3, "outcome": "failed: ClusterError"}],
               "decisions": [], "processes": {"recorded": [1, 2], "left": []}}
    paths = write_report(partial, tmp_path / "out", home=tmp_path)
    md = paths["markdown"].read_text()
    assert "stopped early" in md and "node cloud-b did not register" in md
    assert "failed: ClusterError" in md and json.loads(paths["json"].read_text())["error"]


def test_burst_section_costs_node_seconds_against_the_peak_held_and_plots_nodes(tmp_path):
    from types import SimpleNamespace

    from hybridray.audit import AuditLog
    from hybridray.demo.burst import _account

    audit = AuditLog.for_cluster("r1-burst", tmp_path)
    t0 = 1_000.0
    node = {"site": "cloud-a", "pool": "cpu", "price_per_hour": 0.36, "node_type": "cloud-a.cpu"}
    for rec in ({"event": "node-launch", "key": "cloud-a.cpu.1", "launched_at": t0 + 2},
                {"event": "node-launch", "key": "cloud-a.cpu.2", "launched_at": t0 + 4},
                {"event": "node-stop", "key": "cloud-a.cpu.1", "ended_at": t0 + 22,
                 "reason": "idle"},
                {"event": "node-stop", "key": "cloud-a.cpu.2", "ended_at": t0 + 24,
                 "reason": "idle"}):
        audit.record(**rec, **node)
    # the audit log stamps records now; move them into the step's window
    lines = [json.loads(x) for x in audit.path.read_text().splitlines()]
    for i, r in enumerate(lines):
        r["ts"] = t0 + 2 + i
    audit.path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    fact = {"cluster": "r1-burst", "file": "clusters/elastic.yaml", "tasks": 8, "task_s": 6,
            "idle_timeout_s": 10, "sites": ["onprem", "cloud-a"], "demand_at": t0,
            "drained_at": t0 + 12, "zero_at": t0 + 40, "reached_zero": True,
            "tasks_by_site": {"onprem": 4, "cloud-a": 4}, "first_cloud_task_s": 6.5,
            "results": [{"site": "cloud-a", "node": "cloud-a.cpu.1", "started": t0 + 6.5,
                         "ended": t0 + 12.5}]}
    _account(SimpleNamespace(name="r1-burst", home=str(tmp_path)), fact)
    assert fact["peak"] == "2 cloud-a"
    cost = fact["cost"]
    assert cost["cloud_node_hours"] == pytest.approx(40 / 3600)    # 20 s + 20 s up
    assert cost["actual"] == pytest.approx(40 / 3600 * 0.36)
    assert cost["peak_held"] == pytest.approx(2 * 0.36 * 40 / 3600)  # two nodes, all 40 s
    assert cost["saved_pct"] == pytest.approx(50.0)
    f = facts(tmp_path)
    f["burst"] = fact
    paths = write_report(f, tmp_path / "out", home=tmp_path)
    assert "burst.png" in {p.name for p in paths["plots"]}
    md = paths["markdown"].read_text()
    assert "**50% saved**" in md and "back to zero nodes" in md and "(burst.png)" in md
