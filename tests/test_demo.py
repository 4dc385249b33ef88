"""The quick demo end to end, judged by its own report.json, from an installed package,
next to a user's cluster.

It runs ``hybridray demo --quick`` as a user would: hybridray ``pip install``-ed (not
editable) into a fresh venv outside the repository, the command run from an empty directory
(so the cluster file and configs must come with the package), under its own HYBRIDRAY_HOME
and cluster name, so it never touches the session's shared cluster; ports are picked free by
``up``. It kills one of its own nodes on purpose. In the same home a user's ``local`` cluster
(clusters/local.yaml) runs beside it, holding data at the very paths the demo writes to
(tickets, a masked copy synced to cloud-a, a corpus, a checkpoint): every byte of it must be
unchanged afterwards (issue 15: the demo once replaced a user's datasets).

Installing hybridray's dependencies again (torch, Ray: two minutes of a 2-core machine) would
test pip, not hybridray: the fresh venv sees this test run's site-packages through a ``.pth``
file (which does not run the checkout's editable-install hook), and ``pip install --no-deps``
installs hybridray itself from a copy of the checkout's files. What it checks is what a
wheel carries: the modules, the shipped configs and the ``hybridray`` command.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

# What a pytest process that used the shared cluster may have exported; the demo must not
# inherit them (it would talk to, or store into, the session's cluster).
FOREIGN_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
               "RAY_API_SERVER_ADDRESS", "HYBRIDRAY_CLUSTER", "HYBRIDRAY_SERVE_TOKENS")


def install_outside_checkout(where: Path) -> Path:
    """``pip install`` hybridray (a copy of the checkout's files) into a fresh venv at
    ``where``; returns the venv's ``bin``. Dependencies come from this run's site-packages."""
    src = where / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        "_shipped", "benchmarks", "tests", "docs"))
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = subprocess.run([venv / "bin/python", "-c", "import sysconfig; print("
                              "sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    Path(purelib, "_hybridray_test_deps.pth").write_text("\n".join(site.getsitepackages()))
    proc = subprocess.run([venv / "bin/python", "-m", "pip", "install", "-q", "--no-deps",
                           "--no-compile", str(src)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return venv / "bin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return install_outside_checkout(tmp_path_factory.mktemp("installed"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory, installed):
    home = tmp_path_factory.mktemp("demo-home")
    empty = tmp_path_factory.mktemp("empty-cwd")
    out = home / "report"
    env = {k: v for k, v in os.environ.items()
           if k not in FOREIGN_ENV and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HYBRIDRAY_HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{installed}{os.pathsep}{env.get('PATH', '')}")
    hr = [str(installed / "hybridray")]
    user = _users_cluster(home, env, hr)
    try:
        before = {root: _tree(root) for root in user["roots"]}
        proc = subprocess.run(
            [*hr, "demo", "--quick", "--name", "t-demo", "--report-dir", str(out)],
            cwd=empty, env=env, capture_output=True, text=True, timeout=1200)
        after = {root: _tree(root) for root in user["roots"]}
    finally:
        subprocess.run([*hr, "down", "local"], cwd=ROOT, env=env, capture_output=True,
                       timeout=300)
    facts_path = out / "report.json"
    assert facts_path.exists(), (f"no report (exit {proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"proc": proc, "facts": json.loads(facts_path.read_text()), "out": out,
            "home": home, "cwd": empty, "installed": installed,
            "user": {**user, "before": before, "after": after}}


def test_the_installed_package_is_what_runs_and_carries_its_configs(installed):
    code = ("import hybridray, hybridray.demo.run as d; print(hybridray.__file__); "
            "print(d.CLUSTER_FILE); print(d.TRAIN_CONFIG)")
    proc = subprocess.run([str(installed / "python"), "-c", code], capture_output=True,
                          text=True, cwd=installed, env={k: v for k, v in os.environ.items()
                                                         if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    module, cluster_file, train_config = proc.stdout.split()
    venv = str(installed.parent)
    assert module.startswith(venv) and not module.startswith(str(ROOT))
    assert cluster_file.startswith(venv) and cluster_file.endswith(
        "hybridray/_shipped/clusters/local.yaml")
    assert Path(train_config).read_text() == (ROOT / "configs/train/tiny.yaml").read_text()


def _users_cluster(home, env, hr) -> dict:
    """A user's ``local`` cluster, up, holding data where the demo's cluster writes its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    up = subprocess.run([*hr, "up", "clusters/local.yaml", "--no-dashboard"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    onprem, cloud_a = home / "storage/local/onprem", home / "storage/local/cloud-a"
    tickets = onprem / "datasets/tickets"                       # the demo's own paths
    tickets.mkdir(parents=True)
    ids = list(range(500))
    pq.write_table(pa.table({
        "id": ids, "customer_email": [f"me{i}@mine.example" for i in ids],
        "customer_phone": [f"+1 555 200 {1000 + i}" for i in ids],
        "body": [f"my own ticket {i}" for i in ids],
        "created_at": pa.array([i * 60_000_000 for i in ids], pa.timestamp("us")),
        "amount": [float(i) for i in ids]}), tickets / "part-000.parquet")
    corpus = onprem / "datasets/stdlib-bytes"
    corpus.mkdir(parents=True)
    (corpus / "manifest.json").write_text('{"mine": "a corpus of my own"}\n')
    (onprem / "checkpoints/demo-lm").mkdir(parents=True)
    (onprem / "checkpoints/demo-lm/notes.txt").write_text("my own run\n")
    shell = subprocess.run([*hr, "env", "local"], cwd=ROOT, env=env, capture_output=True,
                           text=True, check=True).stdout
    driver = dict(env)
    for line in shell.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            driver[key] = shlex.split(value)[0] if value else ""
    sync = subprocess.run(
        [*hr, "sync", "onprem:datasets/tickets", "cloud-a:datasets/tickets", "--cluster",
         "local", "--data-class", "restricted", "--mask", "configs/masks/tickets.yaml",
         "--json"], cwd=ROOT, env=driver, capture_output=True, text=True, timeout=600)
    assert sync.returncode == 0, sync.stdout[-2000:] + sync.stderr[-2000:]
    assert json.loads(sync.stdout)["rows"] == 500
    return {"roots": [onprem, cloud_a]}


def _tree(root) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_users_cluster_and_every_byte_of_its_data_are_untouched(demo):
    user = demo["user"]
    for root in user["roots"]:
        assert len(user["before"][root]) >= 3, root              # there was data to lose
        assert user["after"][root] == user["before"][root], root
    assert (user["roots"][1] / "datasets/tickets/_CURRENT").is_file()   # committed by the user
    demo_root = demo["home"] / "storage/t-demo/onprem"                 # the demo's own storage
    assert (demo_root / "datasets/tickets").is_dir()
    assert (demo_root / "datasets/stdlib-bytes/manifest.json").is_file()
    assert (demo["home"] / "storage/t-demo/cloud-a/datasets/tickets/_CURRENT").is_file()


def test_the_demo_exits_cleanly_and_writes_its_report(demo):
    assert demo["proc"].returncode == 0, demo["proc"].stderr[-3000:]
    assert list(demo["cwd"].iterdir()) == []           # it ran from an empty directory
    f = demo["facts"]
    assert f["mode"] == "quick"
    assert [s["outcome"] for s in f["steps"]] == ["ok"] * len(f["steps"])
    assert len(f["steps"]) == 8
    md = (demo["out"] / "report.md").read_text()
    for png in ("training.png", "serving.png", "cost.png", "burst.png"):
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


def test_the_burst_added_cloud_a_nodes_through_rays_autoscaler_and_went_back_to_zero(demo):
    b = demo["facts"]["burst"]
    assert "error" not in b, b.get("error")
    assert b["sites"] == ["onprem", "cloud-a"]                # confidential: not cloud-b
    assert set(b["tasks_by_site"]) == {"onprem", "cloud-a"}   # on-prem full, cloud-a added
    assert sum(b["tasks_by_site"].values()) == b["tasks"]
    assert b["spans"] and {s["key"].rsplit(".", 1)[0] for s in b["spans"]} == {"cloud-a.cpu"}
    assert all(s["reason"] == "idle" for s in b["spans"])      # Ray stopped them when idle
    assert b["reached_zero"] and b["left"] == []
    assert max(max(c) for c in b["timeline"]["nodes"].values()) >= 1
    cost = b["cost"]
    assert 0 < cost["actual"] < cost["peak_held"] and cost["saved_pct"] > 0
    md = (demo["out"] / "report.md").read_text()
    assert "## Burst: cloud nodes from Ray's autoscaler, then none" in md
    assert "back to zero nodes" in md and f"**{cost['saved_pct']:.0f}% saved**" in md
