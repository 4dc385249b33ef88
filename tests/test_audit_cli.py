"""``hybridray audit`` reads as a person would: local time, and per event what matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from hybridray.audit import AuditLog, describe
from tests.paths import ROOT

TS = 1796290699.25


def test_each_event_shows_the_fields_that_matter_in_local_time():
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(TS))
    line = describe({"ts": TS, "event": "transfer", "src": "onprem", "dst": "cloud-a",
                     "bytes": 28365, "cost": 0.0025, "sync_id": "abcdef123456",
                     "destination": "cloud-a:datasets/tickets"})
    assert line == (f"{local}  transfer    onprem → cloud-a  27.7 KiB  $0.0025  "
                    "(sync abcdef12, for cloud-a:datasets/tickets)")
    line = describe({"ts": TS, "event": "placement", "workload": "my-gru", "kind": "train",
                     "count": 2, "cpus": 1, "gpus": 0, "data_class": "restricted",
                     "sites": ["onprem", "cloud-a"], "reasons": {"onprem": "on-prem first"}})
    assert line.endswith("my-gru (train, 2 × 1 CPU, restricted) at onprem → cloud-a  "
                         "[on-prem first]")
    line = describe({"ts": TS, "event": "refusal", "workload": "leak", "kind": "task",
                     "count": 1, "cpus": 1, "data_class": "restricted", "rule": "residency",
                     "message": "no", "fix": "mask it"})
    assert "leak (task, 1 CPU, restricted) REFUSED by residency: no  Fix: mask it" in line
    line = describe({"ts": TS, "event": "sync", "outcome": "committed", "source": "onprem:a",
                     "destination": "cloud-a:a", "version": 2, "bytes_moved": 2048,
                     "cost": 0.0, "data_class": "confidential", "masked": True})
    assert line.endswith("committed onprem:a → cloud-a:a v2, 2.0 KiB moved, $0.0000, "
                         "confidential (masked)")
    assert describe({"ts": TS, "event": "train-end", "run": "r", "steps": 20,
                     "worker_sites": ["onprem", "onprem"], "checkpoint": "onprem:c",
                     "final_eval_loss": 3.7}).endswith(
        "r: 20 steps on onprem, onprem, checkpoint onprem:c, eval loss 3.700")
    assert describe({"ts": TS, "event": "custom", "a": 1}).endswith("custom      a=1")


def test_cli_prints_readable_lines_and_json_on_request(tmp_path):
    log = AuditLog.for_cluster("local", tmp_path)
    log.record("transfer", src="onprem", dst="cloud-b", bytes=3 * 2**20, cost=0.12,
               what="gradients")
    env = {**os.environ, "HYBRIDRAY_HOME": str(tmp_path)}
    run = [sys.executable, "-m", "hybridray", "audit", "local", "--event", "transfer"]
    out = subprocess.run(run, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert "transfer    onprem → cloud-b  3.0 MiB  $0.1200  (gradients)" in out.stdout
    assert out.stdout[:4].isdigit() and "." not in out.stdout.split()[1]   # not epoch seconds
    out = subprocess.run([*run, "--json"], capture_output=True, text=True, env=env, cwd=ROOT,
                         check=True)
    assert json.loads(out.stdout)["bytes"] == 3 * 2**20
    out = subprocess.run([*run[:-2], "--event", "refusal"], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True)
    assert out.stdout.startswith("no refusal records for 'local'")
