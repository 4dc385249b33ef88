"""From a config to Ray Train's configs, decided offline: placement, storage, elastic, restarts."""

from __future__ import annotations

import pytest

from hybridray import labels as L
from hybridray.api import Cluster
from hybridray.audit import AuditLog
from hybridray.exceptions import PlacementRefused, TrainError
from hybridray.placement.capacity import Capacity
from hybridray.storage.fs import parse_address
from hybridray.topology import load_topology
from hybridray.train.config import config_from_dict
from hybridray.train.corpus import CorpusManifest
from hybridray.train.plan import plan_run
from hybridray.train.trainer import build_trainer
from tests.paths import CLUSTERS


class OfflineCluster(Cluster):
    """The topology at full size: decisions without a running Ray cluster."""

    def capacity(self, live: bool = True, **_) -> Capacity:
        return Capacity.from_topology(self.topology)


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDRAY_HOME", str(tmp_path))
    return OfflineCluster(load_topology(CLUSTERS / "local.yaml"),
                          audit=AuditLog(tmp_path / "audit.jsonl"))


def config(*overrides: str):
    return config_from_dict({"name": "plan-test"}, overrides=list(overrides))


def test_burst_placement_becomes_per_worker_label_selectors(cluster):
    cfg = config("data.data_class=internal", "train.cpus_per_worker=2",
                 "train.preference=onprem-first", "train.workers=[1, 3]",
                 "train.max_failures=5", "train.keep_checkpoints=2")
    plan = plan_run(cfg, cluster)
    assert plan.placement.assign(3) == ["onprem", "cloud-b", "cloud-a"]
    corpus = CorpusManifest(parse_address(cfg.data.output, cluster.topology), {"shards": []})
    trainer = build_trainer(cfg, plan, corpus, cluster)
    sc = trainer.scaling_config
    assert sc.num_workers == (1, 3) and sc.elasticity_enabled            # elastic (min, max)
    assert [s[L.SITE] for s in sc.label_selector] == ["onprem", "cloud-b", "cloud-a"]
    assert all(s[L.MAX_DATA_CLASS] == "in(internal,confidential,restricted)"
               for s in sc.label_selector)
    assert sc.resources_per_worker == {"CPU": 2.0}
    rc = trainer.run_config
    assert rc.name == "plan-test" and rc.storage_path.endswith("/storage/local/onprem/checkpoints")
    assert rc.failure_config.max_failures == 5 and rc.checkpoint_config.num_to_keep == 2
    assert trainer.backend_config.backend == "gloo"

    restart = rc.callbacks[0]     # first group: the per-worker selectors; restarts: any allowed
    assert restart.on_controller_start_worker_group(scaling_config=sc, num_workers=3) is None
    assert restart.on_controller_start_worker_group(scaling_config=sc, num_workers=3) == {
        L.SITE: "in(onprem,cloud-b,cloud-a)",
        L.MAX_DATA_CLASS: "in(internal,confidential,restricted)"}
    spec = trainer.train_loop_config
    assert spec["data_class"] == "internal" and spec["model_config"]["n_layer"] == 2


def test_gpu_workers_use_nccl(cluster, tmp_path):
    from hybridray.topology import parse_topology

    pool = "\n".join(" " * 8 + line for line in (
        "cpus: {}", "memory_gb: {}", "count: 1", "price_per_node_hour: {}"))
    text = (CLUSTERS / "local.yaml").read_text().replace(
        pool.format(2, 2, "0.40"),
        pool.format("8\n        gpus: 1\n        accelerator: H100", 64, "2.40"))
    gpu = OfflineCluster(parse_topology(text), audit=AuditLog(tmp_path / "a.jsonl"))
    cfg = config("train.workers=1", "train.gpus_per_worker=1", "train.accelerator=H100",
                 "train.precision=bf16", "train.compile=true", "model.size=gpt2-124m")
    plan = plan_run(cfg, gpu)
    trainer = build_trainer(cfg, plan, CorpusManifest(None, {"shards": []}), gpu)
    assert trainer.backend_config.backend == "nccl"
    assert trainer.scaling_config.use_gpu and trainer.scaling_config.label_selector == [
        {L.SITE: "onprem", L.MAX_DATA_CLASS: "in(restricted)", L.ACCELERATOR: "H100"}]
    assert trainer.train_loop_config["model_config"]["n_embd"] == 768


def test_refusals_come_before_anything_starts(cluster, tmp_path):
    with pytest.raises(PlacementRefused, match="site 'cloud-a' may hold up to confidential"):
        plan_run(config("train.site=cloud-a", "train.burst=false"), cluster)
    with pytest.raises(PlacementRefused, match="need more than the 1 that sites allowed"):
        plan_run(config("train.cpus_per_worker=2"), cluster)         # restricted: one node
    with pytest.raises(TrainError, match="checkpoint.site 'mars': no such site"):
        plan_run(config("checkpoint.site=mars"), cluster)
    assert [r["event"] for r in cluster.audit] == ["refusal", "refusal", "placement"]


def test_elastic_group_places_its_minimum_when_the_maximum_does_not_fit(cluster):
    # internal data may train at every site: 3 nodes of 2 CPUs hold 3 workers, not 4
    plan = plan_run(config("data.data_class=internal", "train.cpus_per_worker=2",
                           "train.workers=[1, 4]"), cluster)
    assert set(plan.placement.sites) == {"onprem", "cloud-a", "cloud-b"}
    assert [r["count"] for r in cluster.audit.read()] == [4, 1]


def test_elastic_group_is_refused_where_ray_would_size_it_from_nodes_it_may_not_use(cluster):
    with pytest.raises(TrainError, match=r"restricted data may not train at cloud-a, cloud-b: "
                                         r"Ray's elastic policy sizes the group"):
        plan_run(config("train.workers=[1, 2]"), cluster)
    with pytest.raises(TrainError, match="train.site=onprem pins the group to one site"):
        plan_run(config("data.data_class=internal", "train.site=onprem",
                        "train.workers=[1, 2]"), cluster)
