"""``hybridray demo``: the whole hybrid story on one machine, for real, in a few minutes.

Brings up clusters/local.yaml as a real three-site Ray cluster (under the name ``demo`` so it
never collides with a cluster of yours), places work by policy and shows Ray obeying it:
restricted work stays on-prem, a named cloud site is refused for restricted data, and with
on-prem full, burstable work falls back to the cheapest allowed cloud. Then it plans a month's
demand with the cost planner, prints the audit summary and tears everything down, checking
that no process it started is left.
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

from hybridray import labels as L

CLUSTER_FILE = Path(__file__).resolve().parent.parent / "clusters" / "local.yaml"


def _where() -> str:
    import ray

    return ray.get_runtime_context().get_node_labels()[L.SITE]


def run_demo(cluster_file: str | os.PathLike = CLUSTER_FILE, *, name: str = "demo",
             home: str | os.PathLike | None = None) -> dict:
    """Run the demo; returns the facts it showed (also used by its test)."""
    import ray
    from rich.console import Console
    from rich.table import Table

    import hybridray
    from hybridray import cluster as lifecycle
    from hybridray.cluster.state import processes_using
    from hybridray.exceptions import PlacementRefused
    from hybridray.planner import Demand, compare

    console = Console()
    facts: dict = {"placements": [], "refusals": []}
    topology = hybridray.load_topology(cluster_file, [f"name={name}"])
    console.rule(f"[bold]hybridray demo[/]: {len(topology.sites)} sites on one machine")
    t0 = time.monotonic()
    with console.status("starting one Ray node process per site ..."):
        state = lifecycle.up(topology, source_file=cluster_file, overrides=[f"name={name}"],
                             home=home, dashboard=False,
                             progress=lambda line: console.print(f"  {line}"))
    facts["up_seconds"] = round(time.monotonic() - t0, 1)
    console.print(f"[green]up[/] in {facts['up_seconds']} s at {state.address} "
                  "(token auth on)")
    try:
        cluster = hybridray.connect(name, home=home)
        _show_sites(console, cluster.topology, Table)

        def run(wl, n=1):
            try:
                refs = [cluster.run(_where, wl) for _ in range(n)]
            except PlacementRefused as e:
                console.print(f"[red]refused[/] {wl.name}: {e}")
                facts["refusals"].append({"workload": wl.name, "rule": e.rule})
                return []
            sites = ray.get(refs, timeout=120)
            counts = dict(collections.Counter(sites))
            console.print(f"[cyan]placed[/] {wl.name} ({wl.data_class.value}, prefer "
                          f"{wl.preference.value}) -> ran at {counts}")
            facts["placements"].append({"workload": wl.name, "data_class":
                                        wl.data_class.value, "ran_at": counts})
            return sites

        console.rule("placement by policy")
        run(hybridray.Workload(name="score-restricted-tickets", cpus=0.5,
                               data_classes=["restricted"]), n=20)
        run(hybridray.Workload(name="public-batch", cpus=0.5), n=4)
        run(hybridray.Workload(name="restricted-on-cloud-a", cpus=0.5, site="cloud-a",
                               data_classes=["restricted"]))

        console.rule("burst: on-prem full, confidential work falls back to the cloud")

        class Busy:
            def site(self):
                return _where()

        holders = [cluster.actor(Busy, hybridray.Workload(name="fill-onprem", cpus=1,
                                                          data_classes=["restricted"]))
                   for _ in range(2)]
        ray.get([h.site.remote() for h in holders])
        console.print("on-prem's 2 CPUs are now held by restricted actors")
        run(hybridray.Workload(name="burst-confidential", cpus=1, preference="onprem-first",
                               data_classes=["confidential"]))
        for h in holders:
            ray.kill(h)

        console.rule("cost planner: a month of demand")
        demand = Demand(hours=720, classes={"restricted": {"cpu_hours": 600},
                                            "internal": {"cpu_hours": 1500}})
        plans = compare(cluster.topology, demand)
        facts["plan"] = {k: (round(v.cost, 2) if hasattr(v, "cost") else "infeasible")
                         for k, v in plans.items()}
        console.print("  ".join(f"{k}: ${v:,.2f}" if isinstance(v, float) else f"{k}: {v}"
                                for k, v in facts["plan"].items()))

        console.rule("audit log")
        records = cluster.audit.read()
        by_event = collections.Counter(r["event"] for r in records)
        facts["audit"] = dict(by_event)
        console.print(f"{cluster.audit.path}: " + ", ".join(f"{n} {e}" for e, n in
                                                             by_event.items()))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        with console.status("stopping every process the demo started ..."):
            lifecycle.down(name, home=home)
        left = processes_using(state.temp_dir + "/")
        facts["processes_left"] = left
        console.print(f"[green]down[/]: {len(state.nodes)} node processes stopped, "
                      f"{len(left)} left")
    return facts


def _show_sites(console, topology, Table) -> None:
    table = Table("site", "kind", "may hold up to", "CPUs", "$/node-h", "storage")
    for name, site in topology.sites.items():
        pool = site.pools[0]
        table.add_row(name, site.kind.value, site.max_data_class.value,
                      f"{site.max_cpus:g}", f"{pool.price_per_node_hour:.2f}",
                      site.storage.root)
    console.print(table)
