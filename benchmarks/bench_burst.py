"""Bursting through Ray's autoscaler: how fast nodes come and go, and what a bursty trace costs.

    python benchmarks/bench_burst.py            # 3 bursts on each cluster
    python benchmarks/bench_burst.py -n 5 --idle 10

One cluster from ``clusters/elastic.yaml`` (a static 2-CPU on-prem node; cloud-a elastic,
``min: 0``, ``max: 2``) runs a bursty trace: ``n`` bursts of confidential ``onprem-first``
tasks (more than on-prem holds), each followed by a quiet period until the cloud is back to
zero nodes. Measured per burst:

* **demand → first task on a new cloud node**: from submitting the burst to the first task
  starting on a node Ray's autoscaler launched for it;
* **last task done → zero cloud nodes**: from the last task's end to the moment Ray stopped
  the last autoscaled node (the GCS's time of death; the pool's idle timeout is the floor);
* **makespan**: from the demand to the last task's end.

The baseline is what one would run instead, at its best: the same cluster **held at peak
size** (cloud-a a static pool of as many nodes as the elastic run peaked at, up from start to
end), running the same bursts separated by the same quiet periods. Its first cloud task starts
on a node that is already up. Node-hours and cost are each cluster's cloud nodes over the same
trace, at the topology's price (on-prem is static and identical in both, so it is left out).
The elastic cluster runs first, since the baseline's size and quiet periods come from it.
Prints its own Markdown tables (``common.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import Section, paired, repeats_table  # noqa: E402

import hybridray  # noqa: E402
from hybridray import cluster as lifecycle  # noqa: E402
from hybridray.audit import AuditLog  # noqa: E402
from hybridray.cluster import elastic  # noqa: E402
from hybridray.cluster.state import processes_using  # noqa: E402
from hybridray.shipped import shipped  # noqa: E402
from hybridray.topology import Topology, load_topology  # noqa: E402

TASKS, TASK_S = 6, 8.0


def task(seconds: float) -> dict:
    import ray

    from hybridray import labels as L
    from hybridray.cluster.plan import NODE

    started = time.time()
    time.sleep(seconds)
    labels = ray.get_runtime_context().get_node_labels()
    return {"site": labels[L.SITE], "node": labels.get(NODE, "?"), "started": started,
            "ended": time.time()}


def held_at_peak(path: Path, overrides: list[str], peak: int) -> Topology:
    """The same topology with cloud-a a static pool of ``peak`` nodes, under a name of its
    own (loaded under that name, so its storage roots are its own too)."""
    name = next(o for o in reversed(overrides) if o.startswith("name=")).split("=", 1)[1]
    data = load_topology(path, [*overrides, f"name={name}-peak"]).model_dump(mode="json")
    pool = data["sites"]["cloud-a"]["pools"][0]
    for key in ("min", "max", "idle_timeout_s"):
        pool.pop(key, None)
    pool["count"] = peak
    return Topology.model_validate(data)


def run_trace(topology: Topology, home: Path, n: int, quiet: list[float] | None,
              *, elastic_run: bool) -> dict:
    """Bring ``topology`` up, run ``n`` bursts, bring it down. With ``quiet`` (the baseline),
    sleep those seconds after each burst instead of waiting for zero nodes."""
    import ray

    state = lifecycle.up(topology, home=home, dashboard=False, timeout=300)
    bursts = []
    try:
        lifecycle.apply_env(lifecycle.ray_env(state))
        cluster = hybridray.connect(topology.name, home=home)
        wl = hybridray.Workload(name="burst", cpus=1, data_classes=["confidential"],
                                preference="onprem-first")
        ray.get(cluster.run(task, wl, 0.0))          # warm: a worker process exists on-prem
        trace_start = time.time()
        for i in range(n):
            before = {x.key for x in elastic.load_nodes(state.state_dir)}
            demand = time.time()
            results = ray.get([cluster.run(task, wl, TASK_S) for _ in range(TASKS)],
                              timeout=600)
            idle = max(r["ended"] for r in results)
            cloud = [r for r in results if r["site"] == "cloud-a"]
            new = [r for r in cloud if r["node"] not in before] if elastic_run else cloud
            row = {"first_cloud_task_s": min(r["started"] for r in new) - demand
                   if new else float("nan"), "makespan_s": idle - demand,
                   "cloud_tasks": len(cloud)}
            if elastic_run:
                deadline = time.time() + 300
                while elastic.load_nodes(state.state_dir) and time.time() < deadline:
                    time.sleep(0.2)
                zero = time.time()
                stops = [r for r in AuditLog.for_cluster(topology.name, home).read("node-stop")
                         if r["ts"] >= demand]
                if stops:
                    zero = max(r.get("ended_at") or r["ts"] for r in stops)
                row["idle_to_zero_s"] = zero - idle
                row["quiet_s"] = time.time() - idle
            else:
                time.sleep(quiet[i])
            bursts.append(row)
            print(f"  {topology.name} burst {i + 1}/{n}: "
                  + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in row.items()), file=sys.stderr, flush=True)
        trace_end = time.time()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        lifecycle.down(topology.name, home=home)
        left = processes_using(state.temp_dir + "/")
    records = [r for r in AuditLog.for_cluster(topology.name, home)
               if r.get("ts", 0) >= trace_start - 1]
    spans = elastic.spans(records, now=trace_end, since=trace_start - 1)
    price = topology.sites["cloud-a"].pools[0].price_per_node_hour
    duration = trace_end - trace_start
    if elastic_run:
        node_s = sum(max(0.0, min(s.end, trace_end) - max(s.start, trace_start))
                     for s in spans if s.site == "cloud-a")
        _, counts = elastic.nodes_over_time(spans, start=trace_start, end=trace_end, step=0.25)
        peak = max(counts.get("cloud-a", [0]))
    else:
        peak = topology.sites["cloud-a"].pools[0].count
        node_s = peak * duration
    return {"bursts": bursts, "duration_s": duration, "cloud_node_hours": node_s / 3600,
            "cost": node_s / 3600 * price, "peak": peak, "left": left}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=3, help="bursts per cluster (default 3)")
    p.add_argument("--idle", type=float, default=10.0,
                   help="idle timeout of the elastic pool, seconds (default 10)")
    p.add_argument("--json", action="store_true", help="also print the raw results")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    section = Section(__file__, argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so no cluster is left behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    overrides = ["name=bench-burst", "head.autoscaler_interval_s=1",
                 f"sites.cloud-a.pools.0.idle_timeout_s={args.idle:g}"]
    path = shipped("clusters/elastic.yaml")
    with tempfile.TemporaryDirectory(prefix="hr-bench-burst-") as tmp:
        home = Path(tmp)
        os.environ["HYBRIDRAY_HOME"] = str(home)   # the file's storage roots, at load
        topology = load_topology(path, overrides)
        print("elastic cluster (cloud-a min 0, max 2):", file=sys.stderr, flush=True)
        burst = run_trace(topology, home, args.n, None, elastic_run=True)
        quiet = [b["quiet_s"] for b in burst["bursts"]]
        peak = max(1, burst["peak"])
        print(f"held at peak (cloud-a count {peak}):", file=sys.stderr, flush=True)
        held = run_trace(held_at_peak(path, overrides, peak), home, args.n, quiet,
                         elastic_run=False)

    price = topology.sites["cloud-a"].pools[0].price_per_node_hour
    e, h = burst["bursts"], held["bursts"]
    print(section.header(
        f"clusters/elastic.yaml, {args.n} bursts on each cluster. Each burst: {TASKS} "
        f"confidential onprem-first tasks of 1 CPU × {TASK_S:g} s on a 2-CPU on-prem node; "
        f"cloud-a nodes have 2 CPUs at ${price}/h, idle timeout {args.idle:g} s, autoscaler "
        f"round 1 s. Elastic: cloud-a min 0, max 2 (Ray's autoscaler v2, local provider); "
        f"held at peak: cloud-a a static pool of {peak} node(s), up the whole trace"))
    print(repeats_table([
        ("elastic: demand → first task on a new cloud node (s)",
         [b["first_cloud_task_s"] for b in e], "{:.2f}"),
        ("elastic: last task done → zero cloud nodes (s)",
         [b["idle_to_zero_s"] for b in e], "{:.2f}"),
        ("elastic: makespan (s)", [b["makespan_s"] for b in e], "{:.2f}"),
        ("held at peak: demand → first cloud task (s)",
         [b["first_cloud_task_s"] for b in h], "{:.2f}"),
        ("held at peak: makespan (s)", [b["makespan_s"] for b in h], "{:.2f}"),
        ("**makespan ratio elastic / held at peak** (paired)",
         paired([b["makespan_s"] for b in e], [b["makespan_s"] for b in h]), "{:.2f}"),
    ], "burst"))
    print()
    print("| the whole trace | elastic (Ray's autoscaler) | held at peak size | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| trace duration (s) | {burst['duration_s']:.1f} | {held['duration_s']:.1f} | |")
    print(f"| cloud-a nodes at peak | {burst['peak']} | {peak} | |")
    print(f"| cloud-a node-hours | {burst['cloud_node_hours']:.4f} | "
          f"{held['cloud_node_hours']:.4f} | "
          f"{burst['cloud_node_hours'] / held['cloud_node_hours']:.2f}x |")
    print(f"| cloud-a cost ($) | {burst['cost']:.5f} | {held['cost']:.5f} | "
          f"{burst['cost'] / held['cost']:.2f}x |")
    print(f"| processes left after down | {len(burst['left'])} | {len(held['left'])} | |")
    if args.json:
        print(json.dumps({"elastic": burst, "held": held}, default=str))


if __name__ == "__main__":
    main()
