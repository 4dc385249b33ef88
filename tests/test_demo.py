"""The quick demo end to end, judged by its own report.json.

It runs ``hybridray demo --quick`` as a user would (a subprocess), under its own
HYBRIDRAY_HOME and cluster name, so it never touches the session's shared cluster; ports are
picked free by ``up``. It kills one of its own nodes on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.paths import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

# What a pytest process that used the shared cluster may have exported; the demo must not
# inherit them (it would talk to, or store into, the session's cluster).
FOREIGN_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
               "RAY_API_SERVER_ADDRESS", "HYBRIDRAY_CLUSTER", "HYBRIDRAY_SERVE_TOKENS")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("demo-home")
    out = home / "report"
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(HYBRIDRAY_HOME=str(home), PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        [sys.executable, "-m", "hybridray", "demo", "--quick", "--name", "t-demo",
         "--report-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    facts_path = out / "report.json"
    assert facts_path.exists(), (f"no report (exit {proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"proc": proc, "facts": json.loads(facts_path.read_text()), "out": out,
            "home": home}


def test_the_demo_exits_cleanly_and_writes_its_report(demo):
    assert demo["proc"].returncode == 0, demo["proc"].stderr[-3000:]
    f = demo["facts"]
    assert f["mode"] == "quick"
    assert [s["outcome"] for s in f["steps"]] == ["ok"] * len(f["steps"])
    assert len(f["steps"]) == 7
    md = (demo["out"] / "report.md").read_text()
    for png in ("training.png", "serving.png", "cost.png"):
        assert png in f["plots"] and (demo["out"] / png).stat().st_size > 5000
        assert f"({png})" in md
    assert "Traceback" not in demo["proc"].stdout + demo["proc"].stderr


def test_restricted_work_ran_only_on_prem(demo):
    f = demo["facts"]
    assert f["restricted_work"]["sites"] == ["onprem"]
    assert f["training"]["data_class"] == "restricted"
    assert f["training"]["worker_sites"] == ["onprem", "onprem"]      # as the workers report
    assert f["training"]["precision"] == "bf16"
    assert f["prepared"]["tickets"]["site"] == "onprem"
    assert f["prepared"]["corpus"]["prepared_at_sites"] == ["onprem"]
    lm = f["serving"]["services"]["demo-lm"]
    assert {r["site"] for r in lm["replicas"]} == {"onprem"}
    assert lm["ingress_sites"] == ["onprem"]
    assert f["serving"]["refused"]["refused"] is True                 # LM at cloud-a: no
    embed = f["serving"]["services"]["demo-embed"]
    assert {r["site"] for r in embed["replicas"]} == {"cloud-a", "cloud-b"}


def test_the_masked_sync_committed_and_the_raw_one_was_refused(demo):
    f = demo["facts"]
    assert f["sync"]["outcome"] == "committed" and f["sync"]["masked"] is True
    assert f["sync"]["data_class"] == "confidential" and f["sync"]["bytes_moved"] > 0
    assert f["refused_sync"]["refused"] is True
    assert f["refused_sync"]["rule"] == "residency"
    assert any(r["kind"] == "data" and "tickets-raw" in (r.get("workload") or "")
               or "tickets-raw" in (r.get("workload") or "")
               for r in f["audit"]["refusals"])
    assert any(x["src"] == "onprem" and x["dst"] == "cloud-a" and x["bytes"] > 0
               for x in f["cross_site_bytes"])


def test_the_loss_fell(demo):
    t = demo["facts"]["training"]
    assert t["steps"] == demo["facts"]["settings"]["train_steps"]
    assert t["final_eval_loss"] < t["initial_eval_loss"] - 0.5


def test_requests_succeeded_through_the_failover(demo):
    s = demo["facts"]["serving"]
    summary = s["summary"]
    assert s["killed"]["site"] == "cloud-b" and s["killed"]["at"] is not None
    assert summary["failed"] == 0, summary["errors"]
    assert summary["before_kill"].get("embedding@cloud-b", 0) > 0     # both sites answered
    assert summary["ok_after_kill"] >= 20
    after = summary["after_kill"]
    assert after.get("embedding@cloud-a", 0) > 0 and after.get("completion@onprem", 0) > 0
    # nothing answered from the dead site once its processes were gone (a request already
    # inside cloud-b when it died may still have been counted at the kill instant)
    late = [r for r in s["load"]["records"] if r["t"] > s["load"]["marks"]["kill"] + 5]
    assert late and all(r["site"] != "cloud-b" for r in late)
    for q in s["quality"].values():
        assert q["method"] == "int8" and q["passed"]


def test_every_process_it_started_is_gone(demo):
    from hybridray.cluster.state import process_start_time, processes_using

    f = demo["facts"]
    assert f["processes"]["left"] == []
    started = f["started_processes"] + f["killed_processes"]
    assert len(f["started_processes"]) >= 5                # head, 3 nodes, the S3 server
    assert len(f["killed_processes"]) >= 2                 # the raylet went with its leader
    alive = [p for p in started if process_start_time(p["pid"]) == p["start_time"]]
    assert alive == []
    assert processes_using(str(demo["home"])) == []
