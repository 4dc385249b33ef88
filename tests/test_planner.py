"""The cost planner: optimal allocations, residency, infeasibility explanations, and the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from hybridray.cli import main
from hybridray.commands.plan import build_demand, summary_line
from hybridray.exceptions import ConfigError, PlanInfeasible
from hybridray.planner import Demand, Plan, compare, plan
from hybridray.topology import DataClass, Topology, load_topology

CLUSTERS = Path(__file__).resolve().parent.parent / "clusters"
ONPREM_AWS = str(CLUSTERS / "onprem-aws.yaml")

def pool(name, cpus, price, count=1, gpus=0):
    return {"name": name, "cpus": cpus, "gpus": gpus, "memory_gb": 8, "count": count,
            "price_per_node_hour": price}


def site(kind, max_class, *pools):
    return {"kind": kind, "provider": "local", "max_data_class": max_class,
            "storage": {"root": "file:///tmp/hybridray-test"}, "pools": list(pools)}


def topo(**sites) -> Topology:
    return Topology.model_validate(
        {"name": "t", "head": {"site": next(iter(sites))}, "sites": sites})


def demand(hours=720, **classes) -> Demand:
    return Demand(hours=hours, classes={
        c: {"cpu_hours": v.get("cpu", 0), "gpu_hours": v.get("gpu", 0)}
        for c, v in classes.items()})


@pytest.fixture
def hybrid() -> Topology:
    """On-prem GPUs that may hold restricted data; cheaper cloud GPUs and CPUs that may not."""
    return topo(
        onprem=site("onprem", "restricted", pool("gpu", 8, 10.0, count=1, gpus=1),
                    pool("cpu", 16, 2.0, count=2)),
        cloud=site("cloud", "internal", pool("gpu", 8, 4.0, count=4, gpus=1),
                   pool("cpu", 16, 1.0, count=1), pool("cpu-big", 16, 1.5, count=10)),
    )


def used(p: Plan) -> dict[tuple[str, str, str], float]:
    return {(a.site, a.pool, a.data_class.value): a.node_hours for a in p.allocations}


# --------------------------------------------------------------------------- optimal plans


def test_restricted_gpu_demand_lands_only_on_prem(hybrid):
    p = plan(hybrid, demand(restricted={"gpu": 500}, public={"gpu": 500}))
    restricted = [a for a in p.allocations if a.data_class is DataClass.restricted]
    assert restricted and {a.site for a in restricted} == {"onprem"}
    assert sum(a.gpu_hours for a in restricted) == pytest.approx(500)
    # public GPU work goes to the cheaper cloud GPUs, not the on-prem ones
    assert used(p) == pytest.approx({("onprem", "gpu", "restricted"): 500,
                                     ("cloud", "gpu", "public"): 500})
    assert p.cost == pytest.approx(500 * 10 + 500 * 4)
    assert p.cost_by_site() == pytest.approx({"onprem": 5000, "cloud": 2000})
    assert p.cost_by_class() == pytest.approx({DataClass.restricted: 5000,
                                               DataClass.public: 2000})


def test_cheaper_cloud_pool_preferred_for_public_work(hybrid):
    p = plan(hybrid, demand(public={"cpu": 1600}))
    assert used(p) == pytest.approx({("cloud", "cpu", "public"): 100})  # 1600 / 16 CPUs
    assert p.cost == pytest.approx(100.0)


def test_capacity_binds_and_work_spills_to_the_next_cheapest_pool(hybrid):
    # cloud/cpu holds 1 node × 720 h × 16 CPUs = 11,520 CPU-hours at $1/node-hour
    p = plan(hybrid, demand(public={"cpu": 16 * 1000}))
    u = used(p)
    assert u[("cloud", "cpu", "public")] == pytest.approx(720)  # full
    assert u[("cloud", "cpu-big", "public")] == pytest.approx(1000 - 720)  # next cheapest
    assert ("onprem", "cpu", "public") not in u
    assert p.cost == pytest.approx(720 * 1.0 + 280 * 1.5)


def test_restricted_work_keeps_the_only_pool_it_may_use(hybrid):
    # onprem/cpu is the cheapest CPU per hour for nobody but restricted work can only go there:
    # with its capacity needed by restricted, confidential work must use the pricier GPU pool.
    t = topo(
        onprem=site("onprem", "restricted", pool("cpu", 16, 0.5, count=1)),
        dc2=site("private", "confidential", pool("gpu", 16, 3.0, count=1, gpus=1)),
    )
    p = plan(t, demand(restricted={"cpu": 16 * 720}, confidential={"cpu": 16 * 100}))
    assert used(p) == pytest.approx({("onprem", "cpu", "restricted"): 720,
                                     ("dc2", "gpu", "confidential"): 100})


def test_gpu_node_hours_count_towards_cpu_demand():
    # hand-computed: 100 GPU node-hours bring 800 CPU-hours along; the other 1,200 CPU-hours
    # come from the CPU pool at 16 CPUs per node: 100 × $3 + 75 × $1 = $375
    # (meeting CPU apart from GPU would cost 300 + 125 = $425)
    t = topo(a=site("cloud", "public", pool("gpu", 8, 3.0, count=1, gpus=1),
                    pool("cpu", 16, 1.0, count=1)))
    p = plan(t, demand(public={"gpu": 100, "cpu": 2000}))
    assert p.cost == pytest.approx(375.0)
    assert used(p) == pytest.approx({("a", "gpu", "public"): 100, ("a", "cpu", "public"): 75})


def test_lp_optimum_equals_brute_force_on_a_small_case():
    # Every node-hour count on an integer grid, all pools × classes; the program's optimum here
    # is integral, so the grid minimum must equal it (and can never be below it).
    t = topo(
        onprem=site("onprem", "restricted", pool("g", 2, 5.0, count=1, gpus=1)),
        cloud=site("cloud", "confidential", pool("g", 4, 3.0, count=1, gpus=2),
                   pool("c", 4, 1.0, count=1)),
    )
    hours = 6
    d = demand(hours=hours, restricted={"gpu": 3, "cpu": 6}, confidential={"gpu": 4, "cpu": 16})
    pools = [("onprem", 2, 1, 5.0), ("cloud", 4, 2, 3.0), ("cloud", 4, 0, 1.0)]
    best = float("inf")
    grid = range(hours + 1)
    for r_on, c_on, c_g, c_c in itertools.product(grid, repeat=4):
        if r_on + c_on > hours:  # onprem/g shared by both classes
            continue
        restricted = [(pools[0], r_on)]
        confidential = [(pools[0], c_on), (pools[1], c_g), (pools[2], c_c)]
        ok = all(sum(p[2] * y for p, y in cls) >= d.need(c, "gpu")
                 and sum(p[1] * y for p, y in cls) >= d.need(c, "cpu")
                 for c, cls in ((DataClass.restricted, restricted),
                                (DataClass.confidential, confidential)))
        if ok:
            best = min(best, sum(p[3] * y for p, y in restricted + confidential))
    assert best == pytest.approx(5 * 3 + 3 * 2 + 1 * 2)  # and by hand: $23
    assert plan(t, d).cost == pytest.approx(best)


def test_free_pool_is_not_filled_beyond_the_demand():
    t = topo(a=site("onprem", "public", pool("free", 4, 0.0, count=10)))
    p = plan(t, demand(public={"cpu": 40}))
    assert p.cost == 0
    assert used(p) == pytest.approx({("a", "free", "public"): 10})


def test_zero_demand_is_an_empty_plan(hybrid):
    p = plan(hybrid, demand(public={}))
    assert p.allocations == () and p.cost == 0


# --------------------------------------------------------------------------- infeasible


def test_infeasible_restricted_demand_names_the_class_site_and_shortfall(hybrid):
    with pytest.raises(PlanInfeasible) as exc:
        plan(hybrid, demand(restricted={"gpu": 1000}))
    (line,) = exc.value.binding
    assert "restricted needs 1,000 GPU-hours" in line
    assert "(onprem)" in line and "720 GPU-hours over 720 h" in line
    assert "short by 280 GPU-hours" in line and "Add GPU capacity at onprem" in line


def test_no_site_may_hold_the_class():
    t = topo(cloud=site("cloud", "confidential", pool("cpu", 4, 1.0)))
    with pytest.raises(PlanInfeasible) as exc:
        plan(t, demand(restricted={"cpu": 1}))
    (line,) = exc.value.binding
    assert line.startswith("no site may hold restricted data")
    assert "confidential, at cloud" in line and "max_data_class" in line


def test_class_without_gpu_pools_is_explained(hybrid):
    t = topo(onprem=site("onprem", "restricted", pool("cpu", 16, 1.0)),
             cloud=site("cloud", "public", pool("gpu", 8, 1.0, gpus=1)))
    with pytest.raises(PlanInfeasible) as exc:
        plan(t, demand(restricted={"gpu": 1}))
    assert "have no GPU pools" in exc.value.binding[0]
    assert "(onprem)" in exc.value.binding[0]


def test_shared_capacity_infeasibility_is_explained(hybrid):
    # onprem/gpu offers 720 GPU-hours; each class fits alone, together they need 1,000
    d = demand(restricted={"gpu": 500}, confidential={"gpu": 500})
    for alone in (demand(restricted={"gpu": 500}), demand(confidential={"gpu": 500})):
        assert plan(hybrid, alone).cost > 0
    with pytest.raises(PlanInfeasible) as exc:
        plan(hybrid, d)
    (line,) = exc.value.binding
    assert "restricted and confidential together need 1,000 GPU-hours" in line
    assert "may hold confidential data (onprem)" in line
    assert "short by 280 GPU-hours" in line and "share" in line


def test_cpu_and_gpu_demand_competing_for_the_same_nodes_is_explained():
    # Each resource fits in total (720 ≥ 720 GPU-hours, 5,760 ≥ 720 CPU-hours), but the GPU
    # demand takes every node-hour of the only pool the CPU demand may use.
    t = topo(onprem=site("onprem", "restricted", pool("gpu", 8, 2.0, count=1, gpus=1)),
             cloud=site("cloud", "internal", pool("cpu", 8, 1.0, count=4)))
    with pytest.raises(PlanInfeasible) as exc:
        plan(t, demand(restricted={"gpu": 720}, confidential={"cpu": 720},
                       public={"cpu": 100}))
    (line,) = exc.value.binding
    assert "restricted GPU-hours (720) and confidential CPU-hours (720)" in line
    assert "public" not in line  # the minimal conflicting set leaves fitting demand out
    assert "onprem/gpu (720 node-hours)" in line
    # the closest plan gives confidential its 90 node-hours and restricted the other 630
    assert "short by 90 GPU-hours of restricted" in line


def test_every_independent_problem_is_reported(hybrid):
    with pytest.raises(PlanInfeasible) as exc:
        plan(hybrid, demand(restricted={"gpu": 1000}, public={"cpu": 10**7}))
    text = "\n".join(exc.value.binding)
    assert len(exc.value.binding) == 2
    assert "restricted needs 1,000 GPU-hours" in text
    assert "public needs 10,000,000 CPU-hours" in text and "(onprem, cloud)" in text


# --------------------------------------------------------------------------- comparisons


def test_compare_on_prem_only_and_cloud_only(hybrid):
    plans = compare(hybrid, demand(restricted={"gpu": 100}, public={"cpu": 1600}))
    best, onprem, cloud = plans["optimal"], plans["onprem-only"], plans["cloud-only"]
    assert isinstance(best, Plan) and isinstance(onprem, Plan)
    assert best.cost == pytest.approx(100 * 10 + 100 * 1.0)
    # restricted's on-prem GPU node-hours bring CPUs, but a node-hour serves one class:
    # public still needs 1600 / 16 = 100 node-hours of onprem/cpu at $2
    assert onprem.cost == pytest.approx(100 * 10 + 100 * 2.0)
    assert onprem.sites == ("onprem",) and {a.site for a in onprem.allocations} == {"onprem"}
    assert isinstance(cloud, PlanInfeasible)
    assert str(cloud).startswith("the demand cannot be met within capacity and residency in "
                                 "the cloud-only plan")
    assert "restricted data may only live at onprem" in cloud.binding[0]
    line = summary_line(plans)
    assert line.startswith("optimal $1,100.00 vs on-prem-only $1,200.00 (+9%) vs ")
    assert "cloud-only infeasible: restricted data may only live at onprem" in line


def test_compare_cloud_only_for_public_work(hybrid):
    plans = compare(hybrid, demand(public={"gpu": 100}))
    assert plans["cloud-only"].cost == pytest.approx(plans["optimal"].cost) == 400
    assert plans["onprem-only"].cost == pytest.approx(1000)


def test_cloud_only_without_cloud_sites():
    t = topo(onprem=site("onprem", "restricted", pool("cpu", 4, 1.0)))
    result = compare(t, demand(public={"cpu": 10}))["cloud-only"]
    assert isinstance(result, PlanInfeasible)
    assert "no sites with nodes" in result.binding[0]


def test_unknown_site_is_refused(hybrid):
    with pytest.raises(KeyError, match="unknown site"):
        plan(hybrid, demand(public={"cpu": 1}), sites=["nowhere"])


# --------------------------------------------------------------------------- demand parsing


def test_demand_flags_and_file_merge(tmp_path):
    f = tmp_path / "demand.yaml"
    f.write_text("hours: 100\nclasses:\n  restricted: {gpu_hours: 800, cpu_hours: 5}\n")
    d = build_demand(["restricted:cpu=2000", "public:gpu=1.5"], str(f), None)
    assert d.hours == 100
    assert d.need(DataClass.restricted, "gpu") == 800
    assert d.need(DataClass.restricted, "cpu") == 2000  # the flag wins
    assert d.need(DataClass.public, "gpu") == 1.5
    assert build_demand(["public:cpu=1"], str(f), "48").hours == 48


@pytest.mark.parametrize("spec, expected", [
    ("restricted:gpu=abc", "gpu must be a number of GPU-hours (got 'abc')"),
    ("secret:gpu=1", "unknown data class 'secret'"),
    ("publc:cpu=1", "did you mean 'public'?"),
    ("restricted:gpu=-5", "must be a finite number >= 0"),
    ("restricted:gpu=nan", "must be a finite number >= 0"),
    ("restricted:tpu=3", "'tpu=3' is not gpu=N or cpu=N"),
    ("restricted", "expected CLASS:gpu=N,cpu=N"),
    ("restricted:gpu=1,gpu=2", "given twice"),
])
def test_bad_demand_strings(spec, expected):
    with pytest.raises(ConfigError) as exc:
        build_demand([spec], None, None)
    assert expected in str(exc.value)
    assert f"--demand {spec!r}" in str(exc.value)


def test_bad_hours_and_missing_demand():
    with pytest.raises(ConfigError, match=r"--hours -5: must be a number of hours above 0"):
        build_demand(["public:cpu=1"], None, "-5")
    with pytest.raises(ConfigError, match="no demand given"):
        build_demand([], None, None)


def test_demand_file_errors_name_the_key(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("classes:\n  restricted: {gpu_hour: 1}\n  secret: {cpu_hours: 1}\n"
                 "  public: {cpu_hours: -1}\nhorizon: 3\n")
    with pytest.raises(ConfigError) as exc:
        build_demand([], str(f), None)
    problems = exc.value.problems
    assert f"{f}: classes.restricted.gpu_hour: unknown key; did you mean 'gpu_hours'?" \
        in problems[0]
    assert any("classes.secret: unknown data class 'secret'" in p for p in problems)
    assert any("classes.public.cpu_hours: " in p and "(got -1)" in p for p in problems)
    assert any(p.startswith(f"{f}: horizon: unknown key") for p in problems)


# --------------------------------------------------------------------------- CLI


def test_cli_prints_plan_and_comparison(capsys):
    rc = main(["plan", ONPREM_AWS, "--demand", "restricted:gpu=800",
               "--demand", "internal:gpu=2000"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "│ onprem │ a100      │ restricted │      100.0 │" in out
    assert "│ aws    │ a10g-spot │ internal   │      500.0 │" in out
    assert ("optimal $2,085.00 vs on-prem-only $3,325.00 (+59%) vs cloud-only infeasible: "
            "restricted data may only live at onprem") in out


def test_cli_override_changes_the_plan(capsys):
    # with one a100 node the restricted GPU demand no longer fits
    rc = main(["plan", ONPREM_AWS, "sites.onprem.pools.0.count=1",
               "sites.onprem.pools.0.hosts=[a]", "--demand", "restricted:gpu=6000"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "restricted needs 6,000 GPU-hours" in err
    assert "offer only 5,760 GPU-hours over 720 h (onprem/a100: 1 node × 8 GPUs)" in err


def test_cli_infeasible_exits_2_with_the_binding_constraint(capsys):
    rc = main(["plan", ONPREM_AWS, "--demand", "restricted:gpu=800",
               "--hours", "10"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.startswith(
        "error: the demand cannot be met within capacity and residency\n")
    assert "restricted needs 800 GPU-hours" in captured.err and "over 10 h" in captured.err


def test_cli_bad_demand_exits_2(capsys):
    rc = main(["plan", ONPREM_AWS, "--demand", "secret:gpu=1"])
    assert rc == 2
    assert "unknown data class 'secret'" in capsys.readouterr().err


def test_cli_json(capsys):
    rc = main(["plan", str(CLUSTERS / "onprem-gke.yaml"), "--demand", "internal:gpu=100,cpu=800",
               "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert data["cluster"] == "onprem-gke"
    best = data["plans"]["optimal"]
    assert best["status"] == "optimal"
    # on-prem L40S: $4.20 / 4 GPUs = $1.05 per GPU-hour beats GKE's spot A100 at $1.47
    assert best["allocations"] == [{"site": "onprem", "pool": "l40s", "class": "internal",
                                    "node_hours": 25.0, "cpu_hours": 800.0,
                                    "gpu_hours": 100.0, "cost": 105.0}]
    assert data["plans"]["onprem-only"]["cost"] == best["cost"] == 105.0
    assert data["plans"]["cloud-only"]["cost"] == pytest.approx(147.0)  # 100 × $1.47


def test_every_shipped_cluster_plans():
    paths = sorted(CLUSTERS.rglob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        p = plan(load_topology(path), demand(public={"cpu": 1}))
        assert p.cost > 0 and len(p.allocations) == 1, path
