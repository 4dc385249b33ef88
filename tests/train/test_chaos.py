"""A worker's node dies mid-run: Ray Train restarts from the latest checkpoint and finishes.

This test kills nodes, so it brings up a cluster of its own (another name, its own
HYBRIDRAY_HOME) and drives training from a separate driver process; the shared cluster is
never touched. On-prem has two nodes here: one dies, the other takes both workers, and the
idle cloud node never gets the restricted data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.paths import CLUSTERS, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

CHECKPOINT_INTERVAL = 10
STEPS = 100
CONFIG = {
    "name": "chaos",
    "data": {"max_files": 24, "shard_files": 12, "output": "onprem:datasets/chaos"},
    "model": {"block_size": 32},
    "train": {"workers": 2, "placement_strategy": "SPREAD", "steps": STEPS,
              "checkpoint_interval": CHECKPOINT_INTERVAL, "log_interval": 5,
              "eval_interval": STEPS, "eval_batches": 2, "micro_batch": 8, "max_failures": 3,
              "warmup_steps": 2},
    "metrics": {"progress": False},
}
DEADLINE_S = 600


def test_node_killed_mid_run_resumes_from_the_latest_checkpoint(tmp_path):
    from hybridray import cluster
    from hybridray.topology import load_topology

    home = tmp_path / "home"
    overrides = ["name=train-chaos", "sites.onprem.pools[0].count=2",
                 "sites.cloud-b.pools[0].count=0"]
    old_home = os.environ.get("HYBRIDRAY_HOME")
    os.environ["HYBRIDRAY_HOME"] = str(home)          # storage roots expand it
    try:
        topology = load_topology(CLUSTERS / "local.yaml", overrides)
    finally:
        if old_home is None:
            os.environ.pop("HYBRIDRAY_HOME")
        else:
            os.environ["HYBRIDRAY_HOME"] = old_home
    state = cluster.up(topology, source_file=CLUSTERS / "local.yaml", overrides=overrides,
                       home=home, dashboard=False, timeout=180)
    out = tmp_path / "result.json"
    log = open(tmp_path / "driver.log", "w")
    driver = None
    try:
        env = {**os.environ, **cluster.ray_env(state), "PYTHONPATH": str(ROOT)}
        driver = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/train/drive_train.py"), state.name,
             json.dumps(CONFIG), str(out)], env=env, cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT)
        run_dir = Path(topology.sites["onprem"].storage.path) / "checkpoints/chaos"
        deadline = time.monotonic() + DEADLINE_S
        # Once the second checkpoint is on disk the first is registered with Ray Train
        # (reports are sequential): from here on a restart must resume, not start over.
        while not any(int(p.parent.name.split("-")[1]) >= 2 * CHECKPOINT_INTERVAL
                      for p in run_dir.glob("checkpoint-*/hybridray.json")):
            assert driver.poll() is None, _tail(tmp_path / "driver.log")
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.05)

        # Kill an on-prem node that runs a training worker (its process group and every
        # process below it: raylet, workers and all), never the driver's node. Both
        # workers may share one node (SPREAD is a preference): then that one dies.
        driver_node = (tmp_path / "result.json.driver-node").read_text()
        nodes = cluster.load_state(state.name, home=home).nodes
        victims = [n for n in nodes if n.site == "onprem" and n.role != "head"
                   and n.node_id != driver_node and _train_workers(n)]
        assert victims, "no training worker runs on an on-prem node"
        killed = _kill_node(victims[0])
        assert any(b"RayTrainWorker" in cmd for cmd in killed.values()), killed

        driver.wait(timeout=max(deadline - time.monotonic(), 1))
        result = json.loads(out.read_text())
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        log.close()
        cluster.down(state.name, home=home)

    assert result["ok"], result
    assert result["steps"] == STEPS
    first, *restarts = result["attempts"]
    assert restarts, f"the run did not notice the lost node: {result}"
    resumed = restarts[0]
    assert resumed["resumed"] and resumed["start_step"] > 0
    assert resumed["start_step"] % CHECKPOINT_INTERVAL == 0
    assert first["max_step"] >= resumed["start_step"] >= CHECKPOINT_INTERVAL
    assert result["steps_redone"] <= CHECKPOINT_INTERVAL
    assert all(site == "onprem" for a in result["attempts"] for site in a["sites"])
    assert result["worker_sites"] == ["onprem", "onprem"]
    assert result["checkpoint"] == f"onprem:checkpoints/chaos/checkpoint-{STEPS:08d}"


def _cmdlines(node) -> dict[int, bytes]:
    from hybridray.procs import descendants

    group = node.group()
    out = {}
    for pid in dict.fromkeys([*group, *descendants(group)]):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = f.read()
        except OSError:
            pass
    return out


def _train_workers(node) -> list[int]:
    return [pid for pid, cmd in _cmdlines(node).items() if b"RayTrainWorker" in cmd]


def _kill_node(node) -> dict[int, bytes]:
    """SIGKILL the node's processes, all found before any dies (so none is missed)."""
    found = _cmdlines(node)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return found


def _tail(path) -> str:
    return "driver exited early:\n" + "\n".join(path.read_text().splitlines()[-30:])
