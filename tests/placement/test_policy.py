"""Placement policy and compiler as pure functions: no Ray needed."""

from __future__ import annotations

import pytest

from hybridray import labels as L
from hybridray.exceptions import PlacementRefused, ResidencyViolation
from hybridray.placement import (
    Capacity,
    NodeCapacity,
    Workload,
    check_residency,
    decide,
    guarded,
    job_submit_kwargs,
    scaling_config,
    serve_options,
    task_options,
)
from hybridray.topology import DataClass, load_topology
from tests.paths import CLUSTERS


@pytest.fixture(scope="module")
def local():
    return load_topology(CLUSTERS / "local.yaml")


@pytest.fixture(scope="module")
def aws():
    return load_topology(CLUSTERS / "onprem-aws.yaml")


def test_restricted_work_only_on_sites_that_may_hold_it(local):
    p = decide(local, Workload(cpus=1, data_classes=["restricted"]))
    assert p.ok and p.sites == ["onprem"]
    assert "may hold up to confidential" in p.excluded["cloud-a"]
    assert "may hold up to internal" in p.excluded["cloud-b"]


def test_highest_of_several_data_classes_governs(local):
    p = decide(local, Workload(cpus=1, data_classes=["public", "confidential", "internal"]))
    assert set(p.sites) == {"onprem", "cloud-a"}


def test_cheapest_orders_by_estimated_cost(local):
    p = decide(local, Workload(data_classes="public", cpus=1))
    assert p.sites == ["cloud-b", "cloud-a", "onprem"]  # 0.11/2 < 0.34/2 < 0.40/2 per CPU-h
    costs = [c.est_cost for c in p.candidates]
    assert costs == sorted(costs)


def test_onprem_first_bursts_to_cloud_in_cost_order(local):
    p = decide(local, Workload(cpus=1, data_classes=["internal"], preference="onprem-first"))
    assert p.sites == ["onprem", "cloud-b", "cloud-a"]
    assert p.candidates[1].reason.startswith("burst to cloud")


def test_no_spot_excludes_spot_pools(local):
    p = decide(local, Workload(data_classes="public", cpus=1, spot_ok=False))
    assert "cloud-b" not in p.sites


def test_near_data_prefers_the_data_site_then_fastest_link(local):
    p = decide(local, Workload(data_classes="public", cpus=1, data_site="cloud-a",
                               preference="near-data"))
    assert p.sites[0] == "cloud-a"
    assert p.sites[1] == "onprem"  # 1000 Mbit/s to cloud-a, vs 200 for cloud-b


def test_egress_cost_can_outweigh_compute_price(local):
    # 100 GB living in cloud-a: moving it to cloud-b costs $2 of egress, more than the
    # compute saved, so the cheapest total is to stay at cloud-a.
    wl = Workload(data_classes="public", cpus=1, data_site="cloud-a", data_bytes=100 * 10**9)
    p = decide(local, wl)
    assert p.sites[0] == "cloud-a"
    assert p.candidates[0].est_cost < p.candidates[-1].est_cost


def test_named_site_first_then_burst_unless_disabled(local):
    p = decide(local, Workload(data_classes="public", cpus=1, site="cloud-a"))
    assert p.sites[0] == "cloud-a" and len(p.sites) == 3
    p = decide(local, Workload(data_classes="public", cpus=1, site="cloud-a", burst=False))
    assert p.sites == ["cloud-a"]
    assert p.excluded["onprem"] == "burst disabled"


def test_named_site_that_may_not_hold_the_data_is_refused_with_fix(local):
    p = decide(local, Workload(cpus=1, site="cloud-b", data_classes=["restricted"]))
    assert not p.ok and p.refusal.rule == "residency"
    with pytest.raises(PlacementRefused) as e:
        p.raise_if_refused()
    assert e.value.rule == "residency"
    assert "onprem" in e.value.fix


def test_unknown_site_refused(local):
    p = decide(local, Workload(data_classes="public", cpus=1, site="mars"))
    assert p.refusal.rule == "unknown-site" and "onprem" in p.refusal.fix


def test_no_site_may_hold_class_is_refused():
    from hybridray.topology import parse_topology

    topo = parse_topology("""
name: pub
head: {site: a}
sites:
  a:
    kind: cloud
    provider: local
    storage: {root: file:///tmp/a}
    pools: [{name: p, cpus: 1, memory_gb: 1, count: 1, price_per_node_hour: 1}]
""")
    assert topo.sites["a"].max_data_class is DataClass.public  # deny by default
    p = decide(topo, Workload(cpus=1, data_classes=["internal"]))
    assert p.refusal.rule == "residency" and "no site may hold internal" in p.refusal.message


def test_shape_that_no_allowed_site_has_is_refused(local):
    p = decide(local, Workload(cpus=1, gpus=1, data_classes=["restricted"]))
    assert p.refusal.rule == "shape"
    assert "1 GPU" in p.refusal.message


def test_count_beyond_allowed_capacity_is_refused(local):
    p = decide(local, Workload(cpus=1, count=3, data_classes=["restricted"]))
    assert p.refusal.rule == "capacity"
    assert "onprem" in p.refusal.message


def test_live_capacity_without_alive_allowed_nodes_refuses(local):
    cap = Capacity([NodeCapacity("cloud-a", "cpu", 2, 2, 0, 0)], live=True)
    p = decide(local, Workload(cpus=1, data_classes=["restricted"]), cap)
    assert p.refusal.rule == "capacity"
    assert "no alive node" in p.refusal.message


def test_assign_fills_free_capacity_in_order(local):
    cap = Capacity([NodeCapacity("onprem", "cpu", 2, 1, 0, 0),
                    NodeCapacity("cloud-a", "cpu", 2, 2, 0, 0),
                    NodeCapacity("cloud-b", "spot", 2, 2, 0, 0)], live=True)
    p = decide(local, Workload(cpus=1, count=3, data_classes=["internal"],
                               preference="onprem-first"), cap)
    assert p.assign() == ["onprem", "cloud-b", "cloud-b"]


def test_accelerator_and_gpu_pools(aws):
    p = decide(aws, Workload(cpus=8, gpus=8, accelerator="H100", data_classes=["confidential"]))
    assert p.sites == ["aws"] and p.primary.pool == "h100"
    p = decide(aws, Workload(cpus=8, gpus=1, data_classes=["restricted"]))
    assert p.sites == ["onprem"] and p.primary.pool == "a100"


def test_task_options_compile_to_selector_and_fallbacks(local):
    p = decide(local, Workload(cpus=0.5, memory_gb=1, data_classes=["internal"],
                               preference="onprem-first"))
    opts = task_options(p)
    assert opts["num_cpus"] == 0.5 and opts["memory"] == 2**30
    assert opts["label_selector"][L.SITE] == "onprem"
    assert opts["label_selector"][L.MAX_DATA_CLASS] == "in(internal,confidential,restricted)"
    assert [f["label_selector"][L.SITE] for f in opts["fallback_strategy"]] == [
        "cloud-b", "cloud-a"]


def test_compiled_selectors_pass_rays_own_validation(local):
    from ray._private.label_utils import validate_label_selector

    p = decide(local, Workload(cpus=1, data_classes=["confidential"]))
    opts = task_options(p)
    assert validate_label_selector(opts["label_selector"]) is None
    for fb in opts["fallback_strategy"]:
        assert validate_label_selector(fb["label_selector"]) is None


def test_refused_placement_does_not_compile(local):
    p = decide(local, Workload(cpus=1, site="cloud-b", data_classes=["restricted"]))
    with pytest.raises(PlacementRefused):
        task_options(p)


def test_serve_job_and_train_compilers(local):
    p = decide(local, Workload(kind="train", cpus=1, count=3, data_classes=["internal"],
                               preference="onprem-first"))
    sc = scaling_config(p)
    assert sc.num_workers == 3
    assert [s[L.SITE] for s in sc.label_selector] == ["onprem", "onprem", "cloud-b"]
    assert sc.resources_per_worker == {"CPU": 1.0}
    serve = serve_options(p)
    assert serve["ray_actor_options"]["label_selector"][L.SITE] == "onprem"
    job = job_submit_kwargs(p)
    assert job["entrypoint_label_selector"][L.SITE] == "onprem"
    assert job["entrypoint_num_cpus"] == 1.0


def test_guard_refuses_on_a_node_below_the_class():
    labels = {L.SITE: "cloud-b", L.MAX_DATA_CLASS: "internal"}
    with pytest.raises(ResidencyViolation) as e:
        check_residency("restricted", labels)
    assert "cloud-b" in str(e.value) and "restricted" in str(e.value)
    assert check_residency("internal", labels) == "cloud-b"


def test_guard_denies_unlabelled_nodes():
    with pytest.raises(ResidencyViolation, match="deny by default"):
        check_residency("public", {})


def test_guarded_decorator_checks_before_running(monkeypatch):
    import hybridray.placement.guard as guard

    calls = []
    monkeypatch.setattr(guard, "current_node_labels",
                        lambda: {L.SITE: "cloud-a", L.MAX_DATA_CLASS: "confidential"})

    @guarded("restricted")
    def touch():
        calls.append(1)

    with pytest.raises(ResidencyViolation):
        touch()
    assert calls == []  # the body never ran


def test_workload_validation_messages():
    with pytest.raises(ValueError, match="preference 'site' needs site"):
        Workload(data_classes="public", preference="site")
    with pytest.raises(ValueError):
        Workload(data_classes=["secret"])


def test_long_fallback_lists_merge_their_tail_into_one_selector():
    import sys

    from hybridray.placement.compile import MAX_ORDERED_FALLBACKS
    from tests.paths import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_placement import make_topology

    topo = make_topology(n_sites=20, nodes_per_site=4)
    p = decide(topo, Workload(data_classes="public", cpus=1))
    assert len(p.sites) == 20
    fb = task_options(p)["fallback_strategy"]
    assert len(fb) == MAX_ORDERED_FALLBACKS + 1
    tail = fb[-1]["label_selector"][L.SITE]
    assert tail == f"in({','.join(p.sites[1 + MAX_ORDERED_FALLBACKS:])})"


def test_each_fallback_is_its_sites_own_selector_and_the_tail_keeps_only_poolless_sites():
    """``selectors`` computes the constraint and pools once per placement; every selector it
    writes must still be what ``site_selector`` gives for that site alone."""
    import sys

    from hybridray.placement.compile import MAX_ORDERED_FALLBACKS, selectors, site_selector
    from tests.paths import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_placement import live_capacity, make_topology, make_workloads

    topo = make_topology(n_sites=20, nodes_per_site=4)
    cap = live_capacity(topo)
    placed = [p for p in (decide(topo, w, cap) for w in make_workloads(topo, n=300)) if p.ok]
    with_pools = 0
    for p in placed:
        primary, fallback = selectors(p)
        assert primary == site_selector(p, p.sites[0])
        ordered = p.sites[1:1 + MAX_ORDERED_FALLBACKS]
        for site, fb in zip(ordered, fallback[:len(ordered)], strict=True):
            assert fb["label_selector"] == site_selector(p, site)
        pools = {c.site: c.pools for c in reversed(p.candidates)}
        with_pools += any(pools.values())
        rest = [s for s in p.sites[1 + MAX_ORDERED_FALLBACKS:] if not pools.get(s)]
        if rest:
            assert fallback[-1]["label_selector"][L.SITE] == f"in({','.join(rest)})"
        else:
            assert len(fallback) == len(ordered)
    assert placed and with_pools, "the workloads must include pool-restricted placements"
