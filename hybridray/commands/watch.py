"""``hybridray status NAME --watch``: one cluster, live, refreshed every few seconds.

What runs (``cluster.status``: processes and the GCS) beside what work is on it and what it
has cost (``cluster.activity``: the audit log and the topology's prices).
"""

from __future__ import annotations

import time
from typing import Any

from hybridray.exceptions import ClusterNotFound, ConfigError


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def view(report: dict[str, Any], act: dict[str, Any], *, now: float | None = None) -> Any:
    """The live view as one rich renderable (pure: easy to test)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = time.time() if now is None else now
    color = {"up": "green", "degraded": "yellow"}.get(report["state"], "red")
    accrued = sum(v["compute"] + v["egress"] for v in act["cost"].values())
    head = Text.from_markup(
        f"cluster [bold]{report['name']}[/] is [{color}]{report['state']}[/] · "
        f"{time.strftime('%H:%M:%S', time.localtime(now))} · cost rate "
        f"[bold]${act['rate_per_hour']:.2f}/h[/] · spent since up [bold]${accrued:.4f}[/]")
    sites = Table(title="sites", expand=False)
    for col in ("site", "kind", "nodes", "CPU used/total", "utilisation", "$/hour",
                "spent $"):
        sites.add_column(col, justify="left" if col in ("site", "kind") else "right")
    for name, s in report["sites"].items():
        util = s["cpus_used"] / s["cpus_total"] if s["cpus_total"] else 0.0
        bar = "█" * round(util * 10) + "·" * (10 - round(util * 10))
        c = act["cost"].get(name, {"compute": 0.0, "egress": 0.0})
        alive = f"{s['alive']}/{s['nodes']}"
        sites.add_row(name, s["kind"] or "?",
                      alive if s["alive"] == s["nodes"] else f"[red]{alive}[/]",
                      f"{_num(s['cpus_used'])}/{_num(s['cpus_total'])}",
                      f"{bar} {100 * util:3.0f}%", f"{s['price_per_hour']:.2f}",
                      f"{c['compute'] + c['egress']:.4f}")
    nodes = Table(title="nodes")
    for col in ("node", "site", "pid", "process", "GCS", "CPU used/total"):
        nodes.add_column(col)
    for n in report["nodes"]:
        gcs = {None: "?", True: "[green]alive[/]", False: "[red]dead[/]"}[n["gcs_alive"]]
        process = {None: "-", True: "[green]alive[/]", False: "[red]dead[/]"}[
            n["process_alive"]]
        nodes.add_row(n["key"], n["site"], "-" if n["pid"] is None else str(n["pid"]),
                      process, gcs, f"{_num(n['cpus_used'])}/{_num(n['cpus_total'])}")
    for d in report.get("drift", []):
        nodes.add_row(f"[red]DRIFT {d['node_id'][:12]}[/]", d["site"] or "?", "-", "-",
                      "[green]alive[/]", f"never placed on: {'; '.join(d['reasons'])}")
    work = Table(title="work (from the audit log since up)")
    for col in ("what", "name", "where", "detail"):
        work.add_column(col)
    for t in act["trainings"]:
        work.add_row("training", t["run"], ", ".join(t.get("sites") or []),
                     f"{t.get('data_class')}, running {now - t['since']:.0f} s")
    for name, where in act["services"].items():
        work.add_row("service", name, ", ".join(where), "placed")
    for s in act["syncs"]:
        work.add_row("sync", f"{s['source']} → {s['destination']}", "",
                     f"{s['outcome']}, {_bytes(s.get('bytes_moved') or 0)} moved")
    if not work.rows:
        work.add_row("-", "nothing yet", "", "")
    links = Table(title="bytes between sites")
    for col in ("from", "to", "bytes", "egress $"):
        links.add_column(col, justify="right" if col in ("bytes", "egress $") else "left")
    for b in act["bytes"]:
        links.add_row(b["src"], b["dst"], _bytes(b["bytes"]), f"{b['cost']:.4f}")
    parts = [head, sites, nodes, work]
    if act["bytes"]:
        parts.append(links)
    if not report["gcs"]["reachable"]:
        parts.append(Text(f"GCS not reachable ({report['gcs']['error']}); liveness is from "
                          "the processes only", style="yellow"))
    return Group(*parts)


def watch(name: str, *, interval: float = 2.0, count: int | None = None,
          home: Any = None) -> int:
    """Refresh the view of cluster ``name`` every ``interval`` seconds until Ctrl-C (or
    ``count`` refreshes)."""
    from rich.console import Console
    from rich.live import Live

    from hybridray import cluster
    from hybridray.cluster.activity import activity

    if interval < 0.2:
        raise ConfigError(f"--interval {interval}: must be at least 0.2 seconds")
    if count is not None and count < 1:
        raise ConfigError(f"--count {count}: must be at least 1")
    cluster.load_state(name, home=home)          # ClusterNotFound with the known names
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 140)
    shown = 0
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                try:
                    report = cluster.status(name, home=home)
                    act = activity(name, home=home, report=report)
                except ClusterNotFound:
                    console.print(f"cluster {name!r} is down")
                    return 0
                live.update(view(report, act), refresh=True)
                shown += 1
                if count is not None and shown >= count:
                    return 0
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0
