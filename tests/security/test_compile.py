"""Item 1: every decided constraint (pool, accelerator, market) reaches Ray's options.

For each shipped topology and each accelerator in it, a workload decided for that accelerator
on-demand is compiled for every kind of Ray work (tasks, actors, Train workers, Serve
replicas, Data stages, job entrypoints); each resulting selector, primary and fallbacks, must
match only nodes of pools with that accelerator that are not spot. The nodes are the labels
hybridray gives every pool (``labels.node_labels``), the same the launchers apply.
"""

from __future__ import annotations

import pytest

from hybridray import labels as L
from hybridray.placement import compile as C
from hybridray.placement import decide
from hybridray.placement.workload import Workload
from hybridray.topology import load_topology
from tests.paths import CLUSTERS
from tests.security.helpers import every_selector, matches

TOPOLOGIES = sorted(CLUSTERS.glob("*.yaml"))


def _nodes(topology):
    """(site, pool, labels) of one node of every pool, and the head."""
    out = [(topology.head.site, None, L.node_labels(topology, topology.head.site, None, "head"))]
    for name, site in topology.sites.items():
        out += [(name, p, L.node_labels(topology, name, p)) for p in site.pools]
    return out


def _selectors_for_every_kind(placement) -> dict[str, list[dict[str, str]]]:
    wl = placement.workload
    return {
        "task/actor": every_selector(C.task_options(placement)),
        "serve replica": every_selector(C.serve_options(placement)["ray_actor_options"]),
        "data stage": every_selector(C.data_remote_args(placement)),
        "train worker": C.scaling_config(placement, wl.count).label_selector,
        "job entrypoint": [C.job_submit_kwargs(placement)["entrypoint_label_selector"]],
    }


@pytest.mark.parametrize("path", TOPOLOGIES, ids=[p.stem for p in TOPOLOGIES])
def test_decided_accelerator_on_demand_never_starts_on_another_pool(path):
    topology = load_topology(path)
    nodes = _nodes(topology)
    accelerators = sorted({p.accelerator for s in topology.sites.values() for p in s.pools
                           if p.accelerator}) or [None]
    checked = 0
    for acc in accelerators:
        wl = Workload(name="pinned", cpus=1, gpus=1 if acc else 0, accelerator=acc,
                      spot_ok=False, data_classes="internal", count=2)
        placement = decide(topology, wl)
        on_demand = [(s, p) for s, p, _ in nodes if p is not None and not p.spot
                     and (acc is None or p.accelerator == acc)]
        if not placement.ok:  # e.g. A100 only on spot at gke: refused, so nothing can start
            assert placement.refusal.rule in ("shape", "residency")
            assert not [1 for s, p in on_demand
                        if topology.sites[s].may_hold("internal") and p.gpus >= 1]
            continue
        for kind, sels in _selectors_for_every_kind(placement).items():
            for sel in sels:
                hit = [(s, p.name if p else "head") for s, p, labels in nodes
                       if matches(sel, labels)]
                assert hit, f"{path.stem} {acc} {kind}: {sel} matches no node at all"
                for s, pool in hit:
                    p = next(x for x in topology.sites[s].pools if x.name == pool)
                    assert not p.spot, f"{path.stem} {kind}: {sel} admits spot pool {s}/{pool}"
                    assert acc is None or p.accelerator == acc, \
                        f"{path.stem} {kind}: {sel} admits {s}/{pool} ({p.accelerator})"
                checked += 1
    assert checked > 0


def test_onprem_aws_h100_on_demand_is_the_issue_example():
    """The example from the issue: never a spot A10G for a decided on-demand H100."""
    topology = load_topology(CLUSTERS / "onprem-aws.yaml")
    placement = decide(topology, Workload(gpus=1, accelerator="H100", spot_ok=False,
                                          data_classes="internal"))
    opts = C.task_options(placement)
    assert opts["label_selector"] == {
        L.SITE: "aws", L.MAX_DATA_CLASS: "in(internal,confidential,restricted)",
        L.ACCELERATOR: "H100", L.MARKET_TYPE: "on-demand", L.POOL: "h100"}
    a10g = L.node_labels(topology, "aws", topology.sites["aws"].pools[1])
    assert a10g[L.POOL] == "a10g-spot" and not matches(opts["label_selector"], a10g)


def test_pool_set_is_compiled_when_only_some_pools_fit():
    """A GPU workload without an accelerator still cannot land on the CPU pool's nodes."""
    topology = load_topology(CLUSTERS / "onprem-aws.yaml")
    placement = decide(topology, Workload(gpus=1, data_classes="internal", site="aws",
                                          burst=False))
    sel = C.task_options(placement)["label_selector"]
    assert sel[L.POOL] == "in(h100,a10g-spot)"
    cpu = L.node_labels(topology, "aws", topology.sites["aws"].pools[2])
    assert not matches(sel, cpu)
