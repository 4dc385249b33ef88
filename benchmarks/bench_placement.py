"""Placement: the batch figure (10,000 workloads, 1,000 nodes, 50 sites) and the per-call
path a driver pays (``Cluster.place`` on a live local cluster).

    python benchmarks/bench_placement.py            # targets: batch < 1 s; per call p99 < 2 ms
    python benchmarks/bench_placement.py --calls 5000 --repeats 7
    python benchmarks/bench_placement.py --no-cluster     # the batch figure only

Batch: three runs, each timed ``--repeats`` times: decisions against the topology's
full-size capacity; against live-style per-node capacity (1,000 nodes with random free
CPUs/GPUs, as ``Capacity.from_ray`` builds it); and decision + compilation to Ray options.
One ``Capacity`` serves all 10,000 decisions of a repeat, so its per-shape memo is warm after
the first of each shape (about 96 shapes): what a scheduler deciding many at once pays.

Per call: ``hybridray up`` of clusters/local.yaml (its own name and home), then ``--calls``
calls of ``Cluster.place`` with workloads drawn at random: each call takes live capacity
from the cluster's snapshot (``hybridray.placement.snapshot``: never older than 1 s, normally
refreshed every 0.25 s by a background thread while decisions come; a fresh ``Capacity``, so
a cold memo), decides, and appends the decision to the audit log (a file write under
``flock``). Median and p99 microseconds per decision, the same for each part alone (and for
``Capacity.from_ray``, one fresh reading: what every call paid before the snapshot, and what
a refresh costs now), and how old the capacity each decision used was. Then the same calls
paced ``--pace-ms`` apart (a driver placing work as it comes), where the background refresh
runs between and during decisions.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import Section, median, repeats_table, verdict  # noqa: E402

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


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def batch(args) -> str:
    section = Section(__file__, args.argv)
    topo = make_topology()
    n_nodes = sum(p.max_nodes for s in topo.sites.values() for p in s.pools)
    wls = make_workloads(topo)
    cap = live_capacity(topo)
    placed = sum(decide(topo, w).ok for w in wls)

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

    rows = [(label, timed(fn, args.repeats), "{:.3f}") for label, fn in (
        ("decide, topology capacity (s for 10,000)", full),
        ("decide, live per-node capacity (s for 10,000)", live),
        ("decide + compile to Ray options (s for 10,000)", compiled))]
    rows += [(label.replace("s for 10,000", "µs per workload"), [x / len(wls) * 1e6
                                                                  for x in values], "{:.0f}")
             for label, values, _ in rows]
    what = (f"Batch: {len(wls)} workloads, {len(topo.sites)} sites, {n_nodes} nodes "
            f"({placed} placed, {len(wls) - placed} refused), one warm Capacity per repeat")
    worst = max(median(values) for _, values, _ in rows[:3])
    return (section.header(what) + "\n" + repeats_table(rows, "run (per repeat)")
            + f"\n\nslowest batch median {worst:.3f} s (target < 1 s): "
              f"{verdict(worst, 1.0, at_least=False)}")


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _row(label: str, values: list[float]) -> str:
    us = [v * 1e6 for v in values]
    return (f"| {label} | {median(us):,.0f} | {_quantile(us, 0.9):,.0f} | "
            f"{_quantile(us, 0.99):,.0f} | {max(us):,.0f} |")


def per_call(args) -> str:
    """``Cluster.place`` on a live local cluster: snapshot capacity, cold memo, audit write."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import hybridray
    from hybridray import cluster as lifecycle
    from hybridray.placement import Capacity
    from hybridray.placement.snapshot import MAX_AGE_S, REFRESH_S
    from hybridray.topology import load_topology

    section = Section(__file__, args.argv)
    home = tempfile.mkdtemp(prefix="hr-bench-place-")
    os.environ["HYBRIDRAY_HOME"] = home
    local = ROOT / "clusters" / "local.yaml"
    overrides = ["name=bench-place"]
    state = lifecycle.up(load_topology(local, overrides), source_file=local,
                         overrides=overrides, home=home, dashboard=False, timeout=180)
    try:
        os.environ.update(lifecycle.ray_env(state))
        cluster = hybridray.connect(state.name, home=home)
        topo = cluster.topology
        wls = make_workloads(topo, n=args.calls, seed=3)
        for w in wls[:20]:              # warm the imports and the GCS connection
            cluster.place(w)
        parts: dict[str, list[float]] = {"place": [], "capacity": [], "from_ray": [],
                                         "decide": [], "audit": [], "age": []}
        for w in wls:
            t = time.perf_counter()
            placement = cluster.place(w)
            parts["place"].append(time.perf_counter() - t)
            parts["age"].append(cluster._snapshots.get().age_s)
            t = time.perf_counter()
            cap = cluster.capacity()
            parts["capacity"].append(time.perf_counter() - t)
            t = time.perf_counter()
            Capacity.from_ray()
            parts["from_ray"].append(time.perf_counter() - t)
            t = time.perf_counter()
            decide(topo, w, cap)
            parts["decide"].append(time.perf_counter() - t)
            t = time.perf_counter()
            cluster.audit.placement(placement, cluster=cluster.name)
            parts["audit"].append(time.perf_counter() - t)
        reads_before = cluster._snapshots.reads
        paced: list[float] = []
        paced_age: list[float] = []
        for w in wls[:args.paced_calls]:
            time.sleep(args.pace_ms / 1000)
            t = time.perf_counter()
            cluster.place(w)
            paced.append(time.perf_counter() - t)
            paced_age.append(cluster._snapshots.get().age_s)
        paced_reads = cluster._snapshots.reads - reads_before
        audited = len(cluster.audit.read("placement"))
    finally:
        import ray

        ray.shutdown()
        lifecycle.down(state.name, home=home)
    lines = ["| per call, µs | median | p90 | p99 | max |", "|---|---:|---:|---:|---:|",
             _row("**Cluster.place (all of it)**", parts["place"]),
             _row("capacity from the snapshot alone (Cluster.capacity)", parts["capacity"]),
             _row("Capacity.from_ray alone (one fresh reading: a refresh)", parts["from_ray"]),
             _row("decide alone (fresh Capacity, cold memo)", parts["decide"]),
             _row("audit write alone (flock + append)", parts["audit"]),
             _row("age of the capacity a decision used (µs)", parts["age"]),
             _row(f"**Cluster.place, calls {args.pace_ms:g} ms apart**", paced),
             _row(f"age of the capacity used, calls {args.pace_ms:g} ms apart (µs)",
                  paced_age)]
    p99 = _quantile(parts["place"], 0.99) * 1e3
    p99_paced = _quantile(paced, 0.99) * 1e3
    what = (f"Per call: {args.calls} calls of Cluster.place back to back on a live "
            f"clusters/local.yaml cluster ({len(topo.sites)} sites, 4 nodes), each with "
            f"capacity from the cluster's snapshot (at most {MAX_AGE_S:g} s old, refreshed "
            f"every {REFRESH_S:g} s in the background while used), a cold memo and an audit "
            f"write; then {args.paced_calls} calls {args.pace_ms:g} ms apart "
            f"({paced_reads} background readings meanwhile); {audited} placement records "
            "written")
    return (section.header(what) + "\n" + "\n".join(lines)
            + f"\n\nCluster.place p99 {p99:.2f} ms back to back, {p99_paced:.2f} ms paced "
              f"(target < 2 ms): {verdict(max(p99, p99_paced), 2.0, at_least=False)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="repeats of each batch run")
    p.add_argument("--calls", type=int, default=2000, help="Cluster.place calls to time")
    p.add_argument("--paced-calls", type=int, default=300,
                   help="then this many calls, --pace-ms apart (default 300)")
    p.add_argument("--pace-ms", type=float, default=20.0,
                   help="milliseconds between the paced calls (default 20)")
    p.add_argument("--no-cluster", action="store_true",
                   help="only the batch figure (no Ray cluster is started)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = argv
    print(batch(args))
    if not args.no_cluster:
        print()
        print(per_call(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
