"""Elastic pools without a cluster: the autoscaling config against Ray's own code, the policy's
view of a pool at zero nodes, pre-provisioning requests, and cost per node-second.

The decisive checks run Ray's autoscaler v2 scheduler itself (``ResourceDemandScheduler``) on
the node types hybridray writes and the label selectors hybridray compiles: what it would
launch for each kind of work is what a live cluster launches (tests/cluster/test_elastic.py
shows that end to end).
"""

from __future__ import annotations

import copy
import json

import pytest

from hybridray import labels as L
from hybridray.cluster import elastic, scale
from hybridray.cluster.plan import plan_nodes
from hybridray.exceptions import ConfigError
from hybridray.placement import Workload, decide
from hybridray.placement.capacity import Capacity, NodeCapacity, elastic_headroom
from hybridray.placement.compile import selectors
from hybridray.topology import load_topology
from tests.paths import CLUSTERS

ELASTIC = CLUSTERS / "elastic.yaml"


@pytest.fixture(scope="module")
def topology():
    return load_topology(ELASTIC)


def config_for(topology) -> dict:
    return elastic.autoscaling_config(
        topology, elastic.elastic_pools(topology), name=topology.name,
        gcs_address="127.0.0.1:6379", state_dir="/tmp/s", temp_dir="/tmp/t", home="/tmp/h")


def test_up_starts_static_pools_only_and_the_autoscaler_gets_the_elastic_ones(topology):
    assert [s.key for s in plan_nodes(topology)] == ["head", "onprem.cpu.0"]
    pools = elastic.elastic_pools(topology)
    assert [(p.node_type, p.min_nodes, p.max_nodes, p.idle_timeout_s) for p in pools] == [
        ("cloud-a.cpu", 0, 2, 60.0), ("cloud-b.spot", 0, 2, 60.0)]
    # --simulate keeps its meaning: one small static node per pool, no autoscaler
    assert elastic.elastic_pools(topology, simulate=True) == []
    assert len(plan_nodes(topology, simulate=True)) == 4


def test_config_passes_rays_own_validation_and_reads_back_per_node_type(topology):
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    config = config_for(topology)
    validate_config(prepare_config(copy.deepcopy(config)))      # what `ray start` checks
    json.dumps(config)                                           # written as JSON
    types = AutoscalingConfig(config).get_node_type_configs()
    a = types["cloud-a.cpu"]
    assert (a.min_worker_nodes, a.max_worker_nodes, a.idle_timeout_s) == (0, 2, 60.0)
    assert a.labels == {k: v for k, v in L.node_labels(
        topology, "cloud-a", topology.sites["cloud-a"].pools[0]).items()}
    assert a.resources["CPU"] == 2 and a.resources[L.site_resource("cloud-a")] == 1000
    assert types[elastic.HEAD_NODE_TYPE].max_worker_nodes == 1  # the head, never launched


def test_the_provider_is_rays_local_provider_and_the_head_id_is_its_own():
    from ray.autoscaler._private.fake_multi_node.node_provider import (
        FAKE_HEAD_NODE_ID,
        FakeMultiNodeProvider,
    )
    from ray.autoscaler._private.providers import _get_node_provider_cls

    cls = _get_node_provider_cls({"type": "external", "module": elastic.PROVIDER_CLASS})
    assert issubclass(cls, FakeMultiNodeProvider)
    assert elastic.HEAD_INSTANCE_ID == FAKE_HEAD_NODE_ID


def _request(workload, topology, avoid=None):
    """The resource request Ray reports for a task placed by hybridray."""
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.common_pb2 import LabelSelectorOperator

    primary, fallback = selectors(decide(topology, workload, _zero_cloud(topology, avoid)))
    ops = []
    for sel in [primary, *[f["label_selector"] for f in fallback]]:
        one = []
        for key, value in sel.items():
            negate = value.startswith("!")
            values = value.lstrip("!").removeprefix("in(").removesuffix(")").split(",")
            op = (LabelSelectorOperator.LABEL_OPERATOR_NOT_IN if negate
                  else LabelSelectorOperator.LABEL_OPERATOR_IN)
            one.append((key, op, values))
        ops.append(one)
    return ResourceRequestUtil.make({"CPU": workload.cpus}, label_selectors=ops)


DRIFT = {"d" * 56: "not a recorded member"}


def _zero_cloud(topology, avoid: dict[str, str] | None = None) -> Capacity:
    """Live capacity of the cluster right after up: on-prem full, no cloud node (``avoid``:
    drift nodes, which every compiled selector then excludes by ``ray.io/node-id``)."""
    alive = [NodeCapacity("onprem", "cpu", 2, 0, 0, 0)]
    return Capacity(alive + elastic_headroom(topology, alive), live=True, avoid=avoid)


def _what_ray_launches(topology, workload, avoid=None) -> tuple[dict[str, int], int]:
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

    types = AutoscalingConfig(config_for(topology)).get_node_type_configs()
    reply = ResourceDemandScheduler().schedule(SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=types,
        resource_requests=[ResourceRequestByCount(request=_request(workload, topology, avoid),
                                                  count=2)]))
    launched: dict[str, int] = {}
    for r in reply.to_launch:
        launched[r.instance_type] = launched.get(r.instance_type, 0) + r.count
    return launched, len(reply.infeasible_resource_requests)


@pytest.mark.parametrize("avoid", [None, DRIFT], ids=["members-only", "with-drift"])
@pytest.mark.parametrize("data_class, launched", [
    ("confidential", {"cloud-a.cpu": 1}),       # the only cloud that may hold it
    ("internal", {"cloud-b.spot": 1}),          # the cheapest cloud that may hold it
    ("restricted", {}),                         # no cloud may: nothing launches
])
def test_rays_scheduler_launches_at_the_right_site_and_no_other(topology, data_class,
                                                                 launched, avoid):
    # with drift in the cluster every selector also carries ray.io/node-id: !in(...): a
    # node type (no node yet) still satisfies it, so a pool at zero stays a burst target
    wl = Workload(cpus=1, data_classes=[data_class], preference="onprem-first")
    got, infeasible = _what_ray_launches(topology, wl, avoid)
    assert got == launched
    assert infeasible == (0 if launched else 2)


@pytest.mark.parametrize("avoid", [None, DRIFT], ids=["members-only", "with-drift"])
def test_no_spot_work_never_lands_on_the_spot_pool(topology, avoid):
    # compiled as ray.io/market-type: on-demand, which only cloud-a's node type carries
    wl = Workload(cpus=1, data_classes=["internal"], preference="onprem-first", spot_ok=False)
    primary, fallback = selectors(decide(topology, wl, _zero_cloud(topology, avoid)))
    assert all(s[L.MARKET_TYPE] == "on-demand" for s in
               [primary, *[f["label_selector"] for f in fallback]])
    assert _what_ray_launches(topology, wl, avoid)[0] == {"cloud-a.cpu": 1}


def test_policy_keeps_a_cloud_pool_at_zero_nodes_as_a_burst_target(topology):
    wl = Workload(cpus=1, data_classes=["confidential"], preference="onprem-first")
    placement = decide(topology, wl, _zero_cloud(topology))
    assert placement.sites == ["onprem", "cloud-a"]
    assert placement.candidates[1].units_free == 0            # not up yet; Ray will add it
    alive = [NodeCapacity("onprem", "cpu", 2, 0, 0, 0), NodeCapacity("cloud-a", "cpu", 2, 2,
                                                                     0, 0, n=2)]
    assert [(h.site, h.n) for h in elastic_headroom(topology, alive)] == [("cloud-b", 2)]


def test_nodes_requests_become_whole_node_bundles_with_site_and_pool_selectors(topology):
    requests = scale.parse_nodes(topology, ["cloud-a.cpu=2", "cloud-b.spot=0"])
    shapes, sels = scale.bundles(topology, requests)
    assert shapes == [{"CPU": 2.0}, {"CPU": 2.0}]
    assert sels == [{L.SITE: "cloud-a", L.POOL: "cpu"}] * 2
    # drift with the pool's labels must not count as room: every bundle keeps off it
    _, sels = scale.bundles(topology, requests, avoid=["b" * 56, "a" * 56])
    assert sels[0]["ray.io/node-id"] == f"!in({'a' * 56},{'b' * 56})"


@pytest.mark.parametrize("spec, message, lists_pools", [
    ("onprem.cpu=1", "onprem.cpu is static (count: 1)", True),
    ("cloud-a.cpu=3", "at most 2 nodes (max)", True),
    ("cloud-c.cpu=1", "no site 'cloud-c'", True),
    ("cloud-a.gpu=1", "site 'cloud-a' has no pool 'gpu'", True),
    ("cloud-a.cpu=-1", "N must be a whole number", False),
    ("cloud-a=1", "expected SITE.POOL=N, e.g. --nodes cloud-a.cpu=1", False),
])
def test_bad_node_requests_are_refused_with_the_fix(topology, spec, message, lists_pools):
    with pytest.raises(ConfigError) as e:
        scale.parse_nodes(topology, [spec])
    assert message in str(e.value)
    assert ("(elastic pools: cloud-a.cpu, cloud-b.spot)" in str(e.value)) == lists_pools


def test_a_cost_plan_becomes_average_nodes_per_elastic_pool(topology):
    from hybridray.planner import Demand, plan

    best = plan(topology, Demand(hours=10, classes={"confidential": {"cpu_hours": 50}}))
    requests = scale.from_plan(topology, {"plans": {"optimal": best.to_dict()}})
    by_type = {r.node_type: r for r in requests}
    # on-prem (static, 2 CPUs) gives 20 of the 50 CPU-hours; cloud-a's 2-CPU nodes the rest:
    # 15 node-hours over 10 h is 1.5 nodes on average, so 2 are kept ready
    assert by_type["cloud-a.cpu"].nodes == 2
    assert by_type["onprem.cpu"].nodes == 0 and "static pool" in by_type["onprem.cpu"].note
    with pytest.raises(ConfigError, match="no optimal allocation"):
        scale.from_plan(topology, {"plans": {"optimal": {"status": "infeasible"}}})


def test_cost_counts_each_autoscaled_node_from_launch_to_stop():
    base = {"site": "cloud-a", "pool": "cpu", "price_per_hour": 0.36}
    records = [
        {"ts": 100.0, "event": "node-launch", "key": "cloud-a.cpu.1", **base},
        {"ts": 110.0, "event": "node-launch", "key": "cloud-a.cpu.2", **base},
        {"ts": 160.0, "event": "node-stop", "key": "cloud-a.cpu.1", "reason": "autoscaler",
         **base},
        {"ts": 170.0, "event": "placement"},
    ]
    spans = elastic.spans(records, now=200.0, alive={"cloud-a.cpu.2"})
    assert [(s.key, s.seconds, s.running) for s in spans] == [
        ("cloud-a.cpu.1", 60.0, False), ("cloud-a.cpu.2", 90.0, True)]
    assert spans[0].cost == pytest.approx(60 / 3600 * 0.36)
    # a node whose processes are gone without a stop record ends at the last record seen
    crashed = elastic.spans(records, now=200.0, alive=set())
    assert crashed[1].seconds == 60.0 and not crashed[1].running
    times, counts = elastic.nodes_over_time(spans, start=100.0, end=200.0, step=10.0)
    assert counts["cloud-a"][:7] == [1, 2, 2, 2, 2, 2, 1] and times[1] == 10.0


def test_train_workers_fill_free_units_then_the_nodes_ray_may_add(topology):
    wl = Workload(cpus=1, count=3, data_classes=["internal"], preference="onprem-first")
    cap = Capacity([NodeCapacity("onprem", "cpu", 2, 1, 0, 0)] + elastic_headroom(
        topology, [NodeCapacity("onprem", "cpu", 2, 1, 0, 0)]), live=True)
    placement = decide(topology, wl, cap)
    assert placement.sites == ["onprem", "cloud-b", "cloud-a"]
    assert placement.candidates[1].units_addable == 4        # two 2-CPU spot nodes
    # one unit where a CPU is free now, the rest where Ray's autoscaler will add a node
    assert placement.assign() == ["onprem", "cloud-b", "cloud-b"]
    assert "4 more on nodes Ray may add" in placement.candidates[1].reason


def test_down_waits_out_a_brief_record_update_but_refuses_a_long_one(tmp_path):
    # The provider of an elastic pool holds the cluster's lock while it records a node Ray
    # launched or stopped; down (wait=seconds) waits that out, a held lock still refuses.
    import threading

    from hybridray.cluster.state import cluster_lock
    from hybridray.exceptions import ClusterError

    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with cluster_lock("c", tmp_path, wait=True):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    with pytest.raises(ClusterError, match="another hybridray up/down/admit of 'c'"):
        with cluster_lock("c", tmp_path, wait=0.3):
            pass
    threading.Timer(0.3, release.set).start()
    with cluster_lock("c", tmp_path, wait=5.0):   # got it once the holder let go
        assert release.is_set()
    t.join(5)


def test_work_beside_held_onprem_is_not_refused_while_a_cloud_pool_may_still_grow(topology):
    # on-prem's CPUs held by actors (they last), no cloud node up: the "can never start"
    # refusal must count the nodes Ray's autoscaler may add, or nothing would ever burst
    from hybridray.waiting import Holder, NodeUsage, Usage

    held = Usage(nodes=[NodeUsage("n" * 56, "onprem", 2, 0, 0, 0, holders=[
        Holder("actor Hold", 2, 0, lasting=True)])], demands=[])
    alive = [NodeCapacity("onprem", "cpu", 2, 0, 0, 0)]
    wl = Workload(cpus=1, data_classes=["internal"], preference="onprem-first")
    burst = Capacity(alive + elastic_headroom(topology, alive), live=True,
                     usage_loader=lambda: held)
    placement = decide(topology, wl, burst)
    assert placement.ok and placement.sites == ["onprem", "cloud-b", "cloud-a"]
    # work only on-prem may hold has no pool to grow: refused, naming what holds on-prem
    restricted = Workload(cpus=1, data_classes=["restricted"], preference="onprem-first")
    refused = decide(topology, restricted, burst)
    assert refused.refusal.rule == "capacity" and "can never start" in refused.refusal.message
