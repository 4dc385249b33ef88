"""Training on the shared three-site cluster: placement by class, burst, WAN bytes, refusals.

clusters/local.yaml: onprem may hold restricted data, cloud-a confidential, cloud-b internal
(spot); 2 CPUs each. Runs are tiny (a few dozen steps of the ``tiny`` model) so the whole
module fits a 2-core machine; what is asserted is where work ran and what it sent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridray.api import Cluster
from hybridray.exceptions import PlacementRefused, TrainError
from hybridray.topology import parse_topology
from hybridray.train.model import generate, load_model
from hybridray.train.trainer import train
from tests.paths import CLUSTERS

pytestmark = pytest.mark.slow

FAST = ["model.block_size=32", "train.micro_batch=8", "train.eval_batches=2",
        "train.warmup_steps=2", "train.max_failures=0", "data.max_files=24",
        "data.shard_files=12", "metrics.progress=false"]


def run(hr_cluster, name: str, *overrides: str):
    return train({"name": name}, hr_cluster, overrides=[*FAST, *overrides], progress=False)


def test_two_sites_burst_loss_falls_and_powersgd_cuts_the_link(hr_cluster):
    r = run(hr_cluster, "burst", "data.data_class=confidential",
            "data.output=onprem:datasets/test-confidential", "train.cpus_per_worker=2",
            "train.preference=onprem-first", "train.steps=24", "train.log_interval=4",
            "train.eval_interval=12", "train.checkpoint_interval=12", "wan.mode=powersgd",
            "wan.powersgd_start=5", "wan.powersgd_rank=1")
    # A worker fills the on-prem node, so the second bursts to the cloud that may hold the data.
    assert r.planned_sites == ["onprem", "cloud-a"]
    assert sorted(r.worker_sites) == ["cloud-a", "onprem"]          # as the workers report
    assert r.final_eval_loss < r.initial_eval_loss - 0.3
    assert r.steps == 24 and r.restarts == 0

    base = r.history[0]["baseline_cross_site_bytes_per_step"]
    assert base > 0
    assert r.history[0]["cross_site_bytes_per_step"] == base        # steps 1-4: plain DDP
    assert all(w["cross_site_bytes_per_step"] < base / 4 for w in r.history[2:])
    assert r.wan["comm_reduction"] > 4

    # The checkpoint lives at the data's site and carries its class.
    assert r.checkpoint == "onprem:checkpoints/burst/checkpoint-00000024"
    model, meta = load_model(r.checkpoint_uri)
    assert meta["data_class"] == "confidential" and meta["site"] in ("onprem", "cloud-a")
    assert isinstance(generate(model, b"def ", 16, temperature=0), bytes)
    sent = hr_cluster.audit.read("transfer", run="burst")
    assert {(t["src"], t["dst"]) for t in sent if "gradients" in t["what"]} == {
        ("onprem", "cloud-a"), ("cloud-a", "onprem")}
    assert any(t["what"] == "corpus shards" and t["dst"] == "cloud-a" for t in sent)


def test_restricted_data_trains_only_on_prem_in_bf16(hr_cluster):
    r = run(hr_cluster, "restricted", "train.steps=6", "train.log_interval=3",
            "train.eval_interval=6", "train.checkpoint_interval=6", "train.precision=bf16")
    # cloud-a and cloud-b are cheaper and idle, but may not hold restricted data.
    assert r.worker_sites == ["onprem", "onprem"]
    assert all(a["sites"] == ["onprem", "onprem"] for a in r.attempts)
    assert r.metrics["precision"] == "bf16" and r.metrics["loss"] == r.metrics["loss"]
    assert r.data_class == "restricted"
    meta = json.loads((Path(r.checkpoint_uri.removeprefix("file://")) / "hybridray.json")
                      .read_text())
    assert meta["data_class"] == "restricted" and meta["site"] == "onprem"
    assert meta["tokenizer"] == "bytes"
    placed = hr_cluster.audit.read("placement", workload="restricted")
    assert placed[-1]["sites"] == ["onprem"]
    assert placed[-1]["excluded"]["cloud-a"].startswith("may hold up to confidential")

    # Re-running the finished run with another model shape is refused before any worker.
    with pytest.raises(TrainError, match=r"checkpoint-00000006/model_config\.json: the "
                                         r"checkpoint's model differs .* n_layer=2 \(this run: 4"):
        run(hr_cluster, "restricted", "train.steps=12", "model.n_layer=4")


def _cluster_with(hr_cluster, tmp_path, *overrides: str) -> Cluster:
    """The same running Ray cluster seen through an edited topology (and its own audit)."""
    from hybridray.audit import AuditLog

    text = (CLUSTERS / "local.yaml").read_text()
    topology = parse_topology(text, overrides=list(overrides))
    return Cluster(topology, audit=AuditLog(tmp_path / "audit.jsonl"))


def test_refused_before_any_worker_starts_when_no_site_may_hold_the_class(hr_cluster,
                                                                          tmp_path):
    cluster = _cluster_with(hr_cluster, tmp_path, "sites.onprem.max_data_class=confidential")
    with pytest.raises(PlacementRefused, match="no site may hold restricted data") as e:
        train({"name": "nowhere"}, cluster, overrides=FAST, progress=False)
    assert e.value.rule == "residency"
    # onprem's live node is labelled restricted, above the edited topology's confidential:
    # that node is drift (recorded, excluded). Apart from that, nothing but the refusal.
    events = [r["event"] for r in cluster.audit]
    assert [e for e in events if e != "drift"] == ["refusal"]
    assert "drift" in events
    storage = Path(hr_cluster.topology.sites["onprem"].storage.path)
    assert not (storage / "checkpoints" / "nowhere").exists()


def test_checkpoints_may_not_go_to_a_site_below_the_data_class(hr_cluster):
    with pytest.raises(PlacementRefused, match="checkpoints inherit the data's class "
                                               "restricted, and site 'cloud-b' may hold up "
                                               "to internal"):
        run(hr_cluster, "leaky", "checkpoint.site=cloud-b")


def test_unwritable_storage_root_is_named(hr_cluster, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cluster = _cluster_with(hr_cluster, tmp_path,
                            f"sites.onprem.storage.root=file://{blocker}/storage")
    with pytest.raises(TrainError, match=f"checkpoint storage file://{blocker}/storage/"
                                         "checkpoints \\(site onprem\\) cannot be written"):
        train({"name": "unwritable"}, cluster, overrides=FAST, progress=False)


def test_corrupt_checkpoint_to_start_from_is_refused_before_workers(hr_cluster, tmp_path):
    from hybridray.train.checkpoint import save_checkpoint
    from hybridray.train.model import GPT

    path = save_checkpoint(tmp_path / "ck", GPT.from_size("tiny"), optimizer={"optimizer": {}},
                           state={"step": 1, "data": {"cursor": 0}},
                           meta={"data_class": "internal", "site": "onprem",
                                 "tokenizer": "bytes"})
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(TrainError, match=r"ck/model\.safetensors: truncated or corrupt"):
        run(hr_cluster, "finetune", f"model.init_from={path}")


def test_cli_dry_run_prints_the_decisions_and_starts_nothing(local_cluster):
    import os
    import subprocess
    import sys

    from hybridray.cluster import ray_env
    from tests.paths import ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "hybridray", "train", "configs/train/burst.yaml", "name=dry-run",
         "--dry-run", "--cluster", local_cluster.name],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, **ray_env(local_cluster)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["data_class"] == "internal"
    assert list(out["candidates"]) == ["onprem", "cloud-b", "cloud-a"]   # on-prem first
    assert set(out["workers"]) <= {"onprem", "cloud-b", "cloud-a"}      # (by free capacity)
    assert out["checkpoints"].endswith("/storage/local/onprem/checkpoints/dry-run")
    assert out["resume_step"] is None


def test_an_elastic_group_trains_with_what_fits_of_its_range(hr_cluster):
    # workers=[1, 4] of 2 CPUs each, internal data (every site allowed): the 3 nodes hold 3.
    r = run(hr_cluster, "elastic", "data.data_class=internal",
            "data.output=onprem:datasets/test-elastic", "train.workers=[1, 4]",
            "train.cpus_per_worker=2", "train.steps=6", "train.log_interval=3",
            "train.eval_interval=6", "train.checkpoint_interval=6")
    assert 1 <= len(r.worker_sites) <= 3
    assert set(r.worker_sites) <= {"onprem", "cloud-a", "cloud-b"}
    assert r.steps == 6 and r.checkpoint.endswith("checkpoint-00000006")


OWN_MODEL = '''
import torch
from torch import nn


class ByteGRU(nn.Module):
    """A user's own byte-level model: embedding, GRU, output layer."""

    def __init__(self, width):
        super().__init__()
        self.emb = nn.Embedding(256, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.out = nn.Linear(width, 256)

    def forward(self, idx):
        hidden, _ = self.rnn(self.emb(idx))
        return self.out(hidden)


def build(width=32):
    return ByteGRU(width)
'''


def test_own_model_in_a_file_beside_the_config_trains_from_the_cli(local_cluster, tmp_path):
    """model.factory names a module in the working directory: no install on any node (the
    CLI imports it from there and ships it to the workers by value)."""
    import os
    import subprocess
    import sys

    from hybridray.cluster import ray_env

    (tmp_path / "mymodel.py").write_text(OWN_MODEL)
    (tmp_path / "own.yaml").write_text("name: own-model\nmodel:\n  factory: mymodel:build\n"
                                       "  kwargs: {width: 48}\n")
    cli = Path(sys.executable).with_name("hybridray")
    proc = subprocess.run(
        [str(cli), "train", "own.yaml", *FAST, "train.steps=30", "train.lr=3e-3",
         "train.log_interval=10", "train.eval_interval=15", "train.checkpoint_interval=30",
         "--json", "--cluster", local_cluster.name],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={**os.environ, **ray_env(local_cluster)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["steps"] == 30 and r["worker_sites"] == ["onprem", "onprem"]   # restricted data
    assert r["final_eval_loss"] < r["initial_eval_loss"] - 0.5
    ck = Path(r["checkpoint_uri"].removeprefix("file://"))
    assert json.loads((ck / "model_config.json").read_text()) == {
        "kind": "custom", "factory": "mymodel:build", "kwargs": {"width": 48},
        "block_size": 32, "vocab_size": 256}


def test_own_model_passed_from_python_trains_and_loads_back(hr_cluster, tmp_path):
    import os

    from tests.train import custom_models

    noted = tmp_path / "priority"
    r = train({"name": "own-model-py"}, hr_cluster, progress=False, overrides=[
        *FAST, "train.steps=6", "train.log_interval=3", "train.eval_interval=6",
        "train.checkpoint_interval=6"],
        model=lambda: custom_models.build_noting_priority(str(noted), width=16))
    assert r.steps == 6 and set(r.worker_sites) == {"onprem"}
    # Ray nices its workers to 15; the training ranks run at train.worker_niceness (0)
    workers = {line.split()[0]: line.split()[1] for line in noted.read_text().splitlines()
               if line.split()[0] != str(os.getpid())}
    assert len(workers) == 2 and set(workers.values()) == {"0"}, workers
    model, meta = load_model(r.checkpoint_uri, factory=lambda: custom_models.build(width=16))
    assert isinstance(model, custom_models.ByteConvLM)
    assert meta["model_config"]["factory"].startswith("tests.train.test_train_cluster:")
    with pytest.raises(TrainError, match="does not match the model"):
        load_model(r.checkpoint_uri, factory=lambda: custom_models.build(width=8))


def _actor_ids(*classes: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(limit=10000) if a.class_name in classes}


def test_checkpoints_commit_without_waiting_for_ray_trains_poll(local_cluster, hr_cluster):
    """Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; a
    checkpoint counts as committed at the poll that finds it. Set to an hour here, a run with
    three checkpoints (each waited for, as every hybridray run does) still ends: hybridray's
    controller polls when a worker waits for a commit and when the workers finish
    (train/controller.py). Nor does the run start Ray Train's per-run PreemptionWatcher,
    DatasetManager and PlacementGroupCleaner actors (the watcher is a thread of the
    controller; no datasets, no manager; the driver removes the run's placement groups). A
    hang is the failure; the wait is bounded."""
    import os
    import subprocess
    import sys

    from hybridray.cluster import ray_env
    from tests.paths import ROOT

    helpers = ("PreemptionWatcher", "DatasetManager", "PlacementGroupCleaner")
    before = _actor_ids(*helpers)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridray", "train", "configs/train/tiny.yaml", "--json",
         "--cluster", local_cluster.name, "name=prompt-commit", "train.steps=12",
         "train.log_interval=4", "train.eval_interval=12", "train.checkpoint_interval=4",
         "data.output=onprem:datasets/test-prompt-commit", *FAST],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **ray_env(local_cluster), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3600"})
    try:
        out, err = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the run waited for Ray Train's hourly poll:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    r = json.loads(out)
    assert r["steps"] == 12 and r["checkpoint"].endswith("/checkpoint-00000012")
    assert r["restarts"] == 0 and r["end_to_end_tokens_per_s"]
    assert _actor_ids(*helpers) == before
