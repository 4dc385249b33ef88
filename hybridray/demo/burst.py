"""The demo's burst step: rent the peak, pay for it only while it works.

``clusters/elastic.yaml`` runs as a second, small cluster (the first is down by now): one
static on-prem node, and cloud pools at ``min: 0``. Confidential work with ``preference:
onprem-first`` arrives in a burst larger than on-prem; the label selectors hybridray compiles
are all Ray's autoscaler v2 needs to add cloud-a nodes (the only cloud that may hold
confidential data), the work drains, and after the idle timeout the cloud is back to zero
nodes. The report plots nodes per site over time and compares what the burst cost with keeping
the same peak capacity up for the whole step.

Nothing here scales anything: the step submits tasks and watches what Ray's autoscaler does,
from the records the provider writes (``hybridray/cluster/elastic.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hybridray.shipped import shipped

BURST_FILE = shipped("clusters/elastic.yaml")


def burst_task(seconds: float) -> dict[str, Any]:
    """One unit of the burst: say where and when it ran."""
    import ray

    from hybridray import labels as L
    from hybridray.cluster.plan import NODE

    started = time.time()
    time.sleep(seconds)
    labels = ray.get_runtime_context().get_node_labels()
    return {"site": labels[L.SITE], "node": labels.get(NODE, "?"), "started": started,
            "ended": time.time()}


def run(n: Any, name: str, home: Path, quick: bool, facts: dict) -> None:
    """Step 8. Writes ``facts["burst"]``; stops its cluster whatever happens."""
    import ray

    import hybridray
    from hybridray import cluster as lifecycle
    from hybridray.cluster.state import processes_using

    tasks, seconds, idle = (8, 6.0, 10) if quick else (12, 10.0, 20)
    cluster_name = f"{name}-burst"
    overrides = [f"name={cluster_name}", "head.autoscaler_interval_s=1",
                 f"sites.cloud-a.pools.0.idle_timeout_s={idle}",
                 f"sites.cloud-b.pools.0.idle_timeout_s={idle}"]
    topology = hybridray.load_topology(BURST_FILE, overrides)
    fact: dict[str, Any] = {"cluster": cluster_name, "file": "clusters/elastic.yaml",
                            "tasks": tasks, "task_s": seconds, "idle_timeout_s": idle}
    facts["burst"] = fact
    state = None
    with n.step("8. burst: cloud nodes on demand through Ray's autoscaler, then none"):
        try:
            state = lifecycle.up(topology, source_file=BURST_FILE, overrides=overrides,
                                 home=home, dashboard=False, timeout=180,
                                 progress=lambda line: n.say(line))
            lifecycle.apply_env(lifecycle.ray_env(state))   # another cluster, another token
            cluster = hybridray.connect(cluster_name, home=home)
            _burst(n, cluster, state, tasks, seconds, idle, fact)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if state is not None:
                lifecycle.down(cluster_name, home=home)
                fact["left"] = processes_using(state.temp_dir + "/")
        if state is not None and "demand_at" in fact:
            _account(state, fact)
            n.say(f"cloud node-hours {fact['cost']['cloud_node_hours']:.4f} "
                  f"(${fact['cost']['actual']:.5f}) against ${fact['cost']['peak_held']:.5f} "
                  f"to hold the peak ({fact['peak']}) for the whole step: "
                  f"{fact['cost']['saved_pct']:.0f}% saved")


def _burst(n: Any, cluster: Any, state: Any, tasks: int, seconds: float, idle: float,
           fact: dict) -> None:
    import ray

    from hybridray import Workload
    from hybridray.cluster import elastic

    wl = Workload(name="burst", cpus=1, data_classes=["confidential"],
                  preference="onprem-first")
    placement = cluster.place(wl)
    n.decision(f"burst: {tasks} confidential 1-CPU tasks on a 2-CPU on-prem site", "ran",
               placement.sites, "; ".join(f"{c.site}: {c.reason}"
                                          for c in placement.candidates)
               + "; " + "; ".join(f"{s} excluded ({e})" for s, e in placement.excluded.items()),
               kind="task", data_class="confidential")
    fact["sites"] = list(placement.sites)
    demand_at = time.time()
    refs = [cluster.run(burst_task, wl, seconds) for _ in range(tasks)]
    seen: set[str] = set()
    gone: set[str] = set()
    results: list[dict] = []

    def watch() -> None:
        nodes = {x.key: x for x in elastic.load_nodes(state.state_dir)}
        for key in sorted(set(nodes) - seen):
            seen.add(key)
            n.say(f"  + {key}: Ray's autoscaler started it {time.time() - demand_at:.1f}s "
                  "after the demand")
        for key in sorted(seen - set(nodes) - gone):
            gone.add(key)
            n.say(f"  - {key}: stopped {time.time() - demand_at:.1f}s after the demand")

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        results += ray.get(done)
        watch()
    drained_at = time.time()
    n.say(f"  all {tasks} tasks done after {drained_at - demand_at:.1f}s; waiting for the idle "
          f"cloud nodes to stop ({idle:g}s idle timeout)")
    deadline = time.time() + idle + 90
    while elastic.load_nodes(state.state_dir) and time.time() < deadline:
        watch()
        time.sleep(0.5)
    watch()
    zero_at = time.time()
    by_site: dict[str, int] = {}
    for r in results:
        by_site[r["site"]] = by_site.get(r["site"], 0) + 1
    first_cloud = min((r["started"] for r in results if r["site"] != "onprem"), default=None)
    fact.update({
        "demand_at": demand_at, "drained_at": drained_at, "zero_at": zero_at,
        "reached_zero": not elastic.load_nodes(state.state_dir),
        "tasks_by_site": by_site, "results": results,
        "first_cloud_task_s": None if first_cloud is None else first_cloud - demand_at,
    })
    n.say("  tasks by site: " + ", ".join(f"{k} {v}" for k, v in sorted(by_site.items())))


def _account(state: Any, fact: dict) -> None:
    """Cost of the step as it ran, against holding its peak cloud capacity all along."""
    from hybridray.audit import AuditLog
    from hybridray.cluster import elastic

    records = [r for r in AuditLog.for_cluster(state.name, state.home)
               if r.get("ts", 0) >= fact["demand_at"] - 1]
    spans = elastic.spans(records, now=fact["zero_at"], since=fact["demand_at"] - 1)
    start, end = fact["demand_at"], max([fact["zero_at"], *(s.end for s in spans)])
    times, counts = elastic.nodes_over_time(spans, start=start, end=end, step=0.5)
    peak = {site: max(c) for site, c in counts.items()}
    prices = {s.site: s.price_per_hour for s in spans}
    window_h = (end - start) / 3600
    actual = sum(s.cost for s in spans)
    held = sum(peak[site] * prices[site] * window_h for site in peak)
    fact.update({
        "spans": [{"key": s.key, "site": s.site, "pool": s.pool, "start": s.start - start,
                   "end": s.end - start, "reason": s.reason, "cost": s.cost} for s in spans],
        "timeline": {"t": times, "nodes": counts},
        "peak": ", ".join(f"{v} {k}" for k, v in peak.items()) or "none",
        "window_s": end - start,
        "cost": {"actual": actual, "peak_held": held,
                 "cloud_node_hours": sum(s.seconds for s in spans) / 3600,
                 "saved": held - actual,
                 "saved_pct": 100 * (held - actual) / held if held else 0.0},
    })
