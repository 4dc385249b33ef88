"""Placement throughput: 10,000 workloads over a 1,000-node, 50-site topology.

    python benchmarks/bench_placement.py            # target: all 10,000 decisions < 1 s

Prints a Markdown table. Three runs are timed: decisions against the topology's full-size
capacity; decisions against live-style per-node capacity (1,000 individual nodes with
random free CPUs/GPUs, as ``Capacity.from_ray`` builds it); and decision + compilation to Ray
options (what ``Cluster.remote`` does per call).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybridray.placement import Capacity, NodeCapacity, Workload, decide, task_options  # noqa: E402
from hybridray.topology import Topology  # noqa: E402

CLASSES = ["public", "internal", "confidential", "restricted"]


def make_topology(n_sites: int = 50, nodes_per_site: int = 20, seed: int = 0) -> Topology:
    rng = random.Random(seed)
    sites = {}
    names = [f"site-{i:02d}" for i in range(n_sites)]
    for i, name in enumerate(names):
        kind = "onprem" if i % 5 == 0 else "cloud"
        gpu_nodes = nodes_per_site // 4
        pools = [
            {"name": "cpu", "cpus": rng.choice([8, 16, 32]), "memory_gb": 64,
             "count": nodes_per_site - gpu_nodes, "price_per_node_hour": rng.uniform(0.3, 2)},
            {"name": "gpu", "cpus": 32, "gpus": rng.choice([1, 4, 8]),
             "accelerator": rng.choice(["A100", "H100", "L4"]), "memory_gb": 256,
             "count": gpu_nodes, "price_per_node_hour": rng.uniform(2, 40),
             "spot": kind == "cloud" and rng.random() < 0.3},
        ]
        links = {other: {"bandwidth_mbps": rng.choice([100, 1000, 10000]),
                         "latency_ms": rng.uniform(1, 100), "egress_per_gb": rng.uniform(0, 0.1)}
                 for other in rng.sample(names, 5) if other != name}
        sites[name] = {
            "kind": kind, "provider": "local",
            "max_data_class": "restricted" if kind == "onprem" else rng.choice(CLASSES[:3]),
            "storage": {"root": f"file:///tmp/{name}"}, "pools": pools, "links": links,
        }
    return Topology.model_validate({"name": "bench", "head": {"site": names[0]},
                                    "sites": sites})


def make_workloads(topology: Topology, n: int = 10_000, seed: int = 1) -> list[Workload]:
    rng = random.Random(seed)
    names = list(topology.sites)
    out = []
    for i in range(n):
        gpus = rng.choice([0, 0, 0, 1, 4])
        out.append(Workload(
            name=f"w{i}", cpus=rng.choice([0.5, 1, 2, 4]), gpus=gpus,
            count=rng.choice([1, 1, 2, 8]), data_classes=[rng.choice(CLASSES)],
            data_site=rng.choice(names) if rng.random() < 0.5 else None,
            data_bytes=rng.choice([0, 10**9, 10**11]),
            preference=rng.choice(["cheapest", "onprem-first", "near-data", "fastest"]),
            spot_ok=rng.random() < 0.8))
    return out


def live_capacity(topology: Topology, seed: int = 2) -> Capacity:
    rng = random.Random(seed)
    nodes = []
    for name, site in topology.sites.items():
        for pool in site.pools:
            for _ in range(pool.max_nodes):
                nodes.append(NodeCapacity(name, pool.name, pool.cpus,
                                          rng.randint(0, int(pool.cpus)), pool.gpus,
                                          rng.randint(0, pool.gpus), pool.accelerator, pool.spot))
    return Capacity(nodes, live=True)


def timed(fn, repeat: int = 5) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    topo = make_topology()
    n_nodes = sum(p.max_nodes for s in topo.sites.values() for p in s.pools)
    wls = make_workloads(topo)
    cap = live_capacity(topo)
    decisions = [decide(topo, w) for w in wls]
    placed = sum(d.ok for d in decisions)

    def full():
        for w in wls:
            decide(topo, w)

    def live():
        for w in wls:
            decide(topo, w, cap)

    def compiled():
        for w in wls:
            d = decide(topo, w, cap)
            if d.ok:
                task_options(d)

    rows = [("decide, topology capacity", timed(full)),
            ("decide, live per-node capacity", timed(live)),
            ("decide + compile to Ray options", timed(compiled))]
    print(f"{len(wls)} workloads, {len(topo.sites)} sites, {n_nodes} nodes; "
          f"{placed} placed, {len(wls) - placed} refused\n")
    print("| run | median s (5 runs) | min s | µs / workload | target < 1 s |")
    print("|---|---|---|---|---|")
    for label, times in rows:
        med = statistics.median(times)
        print(f"| {label} | {med:.3f} | {min(times):.3f} | {med / len(wls) * 1e6:.0f} | "
              f"{'met' if med < 1 else 'MISSED'} |")


if __name__ == "__main__":
    main()
