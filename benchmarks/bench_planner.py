"""Benchmark the cost planner on 100 sites × 4 data classes, against the plain alternatives.

    python benchmarks/bench_planner.py                 # 100 sites, median of 5
    python benchmarks/bench_planner.py --sites 1000    # a larger synthetic cluster

The plain alternatives, measured in the same run on the same topology and demand:
the same linear program with dense matrices, and a greedy fill that serves the most
restricted class first from the cheapest pool per GPU- (then CPU-) hour. Prints a Markdown
table: median wall time of each, the plan's cost, and both relative to ``plan``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import linprog

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Section, median, repeats_table  # noqa: E402

from hybridray.exceptions import PlanInfeasible
from hybridray.planner import Demand, _Model, compare, plan
from hybridray.topology import DataClass, Topology

KINDS = [("onprem", ("restricted", "confidential")), ("private", ("confidential", "internal")),
         ("cloud", ("confidential", "internal", "public", "public"))]
POOLS = [  # name, cpus, gpus, price per node-hour (cloud list price; on-prem is cheaper)
    ("cpu-16", 16, 0, 0.70), ("cpu-64", 64, 0, 2.60), ("a10g-4", 48, 4, 5.70),
    ("l40s-4", 32, 4, 7.20), ("a100-8", 96, 8, 32.0), ("h100-8", 192, 8, 98.0),
]


def synthetic_topology(n_sites: int, seed: int = 0) -> Topology:
    """``n_sites`` sites (about 30% on-prem, 10% private, 60% cloud), 2-4 pools each."""
    rng = random.Random(seed)
    sites = {}
    for i in range(n_sites):
        kind, classes = rng.choices(KINDS, weights=[3, 1, 6])[0]
        pools = []
        for name, cpus, gpus, price in rng.sample(POOLS, rng.randint(2, 4)):
            factor = rng.uniform(0.4, 0.7) if kind == "onprem" else rng.uniform(0.8, 1.3)
            spot = kind == "cloud" and rng.random() < 0.3
            pools.append({"name": name, "cpus": cpus, "gpus": gpus, "memory_gb": 64,
                          "min": 0, "max": rng.randint(1, 8), "spot": spot,
                          "price_per_node_hour": round(price * factor * (0.4 if spot else 1), 3)})
        sites[f"site-{i:03d}"] = {
            "kind": kind, "provider": "local", "max_data_class": rng.choice(classes),
            "storage": {"root": f"file:///tmp/bench/{i}"}, "pools": pools}
    return Topology.model_validate({"name": "bench", "head": {"site": "site-000"},
                                    "sites": sites})


def synthetic_demand(topology: Topology, load: float = 0.6, hours: float = 720) -> Demand:
    """CPU- and GPU-heavy demand over all 4 classes; restricted sized to ``load`` of its sites."""
    classes = {}
    for c in DataClass:
        pools = [p for n in topology.sites_by_class[c] for p in topology.sites[n].pools]
        exclusive = 1.0 if c is DataClass.restricted else 0.35
        classes[c.value] = {
            "cpu_hours": load * exclusive * sum(p.cpus * p.max_nodes for p in pools) * hours,
            "gpu_hours": load * exclusive * sum(p.gpus * p.max_nodes for p in pools) * hours}
    return Demand(hours=hours, classes=classes)


def dense_lp(topology: Topology, demand: Demand) -> float:
    """The same program as ``plan``, built and solved with dense matrices."""
    model = _Model(topology, demand, None, "dense")
    a = np.vstack([model.a_demand.toarray(), model.a_capacity.toarray()])
    b = np.concatenate([model.b_demand, model.capacity])
    res = linprog(model.price + 1e-7, A_ub=a, b_ub=b, bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return float(model.price @ res.x)


def greedy(topology: Topology, demand: Demand) -> float:
    """Most restricted class first; GPU-hours, then CPU-hours, each from the cheapest pool."""
    left = {(n, p.name): p.max_nodes * demand.hours
            for n, s in topology.sites.items() for p in s.pools}
    cost = 0.0
    for c in sorted(DataClass, reverse=True):
        pools = [(n, p) for n in topology.sites_by_class[c] for p in topology.sites[n].pools]
        cpu_got = 0.0
        for resource in ("gpu", "cpu"):
            need = demand.need(c, resource) - (cpu_got if resource == "cpu" else 0.0)
            per = (lambda p: p.gpus) if resource == "gpu" else (lambda p: p.cpus)  # noqa: E731
            for n, p in sorted((x for x in pools if per(x[1]) > 0),
                               key=lambda x: x[1].price_per_node_hour / per(x[1])):
                if need <= 1e-9:
                    break
                y = min(left[(n, p.name)], need / per(p))
                left[(n, p.name)] -= y
                need -= y * per(p)
                cost += y * p.price_per_node_hour
                cpu_got += y * p.cpus if resource == "gpu" else 0.0
            if need > 1e-6:
                raise PlanInfeasible(f"greedy left {need:.0f} {resource}-hours of {c}", [])
    return cost


def timed(methods: dict[str, object], repeat: int) -> dict[str, tuple[list[float], object]]:
    """Each repeat's ms and the last result of each method, run round-robin so that load from
    other processes on the machine falls on all of them alike (after one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    out: dict[str, object] = {}
    for i in range(repeat + 1):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            out[name] = fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: ([t * 1000 for t in times[name]], out[name]) for name in methods}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    section = Section(__file__, argv)
    topology = synthetic_topology(args.sites)
    demand = synthetic_demand(topology)
    model = _Model(topology, demand, None, "size")
    # confidential GPU demand that fits alone but not beside restricted's: shared capacity
    conf_gpus = sum(p.gpus * p.max_nodes for n in topology.sites_by_class[DataClass.confidential]
                    for p in topology.sites[n].pools) * demand.hours
    too_much = Demand(hours=demand.hours, classes={
        **demand.classes, DataClass.confidential: {
            "cpu_hours": demand.need(DataClass.confidential, "cpu"),
            "gpu_hours": 0.95 * conf_gpus}})

    def infeasible() -> str:
        try:
            plan(topology, too_much)
        except PlanInfeasible as e:
            return e.binding[0]
        raise AssertionError("expected the inflated demand to be infeasible")

    results = timed({
        "`plan` (sparse LP, HiGHS)": lambda: plan(topology, demand),
        "same LP, dense matrices": lambda: dense_lp(topology, demand),
        "greedy cheapest-first": lambda: greedy(topology, demand),
        "`compare` (optimal + on-prem-only + cloud-only)": lambda: compare(topology, demand),
        "infeasible demand, explained": infeasible,
    }, args.repeat)
    times_lp, best = results["`plan` (sparse LP, HiGHS)"]
    why = results["infeasible demand, explained"][1]
    pools = sum(len(s.pools) for s in topology.sites.values())
    print(section.header(
        f"{args.sites} sites, {pools} pools, 4 classes, {len(model.var_pool)} variables, "
        f"{len(model.rows) + len(model.pools)} constraints; methods run round-robin, "
        f"{args.repeat} repeats after a warm-up round"))
    rows = [(f"{name}: ms", times, "{:.1f}") for name, (times, _) in results.items()]
    rows += [(f"{name}: × plan time (paired)", [t / lp for t, lp in zip(times, times_lp,
                                                                      strict=True)], "{:.2f}")
             for name, (times, _) in results.items() if name != "`plan` (sparse LP, HiGHS)"]
    print(repeats_table(rows, "method (per repeat)"))
    print("\n| method | plan cost | × optimal cost |\n|---|---:|---:|")
    for name, (_, out) in results.items():
        cost = out if isinstance(out, float) else getattr(out, "cost", None)
        if cost is not None:
            print(f"| {name} | ${cost:,.0f} | {cost / best.cost:.3f} |")
    print(f"\nmedian plan time {median(times_lp):.1f} ms")
    print(f"\nexplanation: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
