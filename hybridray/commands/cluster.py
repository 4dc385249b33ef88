"""``hybridray up | down | status | env``: a real multi-site Ray cluster on this machine.

    hybridray up clusters/local.yaml                      # head + one node per pool, by site
    hybridray up clusters/onprem-aws.yaml --simulate      # any topology, as small local nodes
    hybridray up clusters/local.yaml --hosts netns        # each node a host, shaped links (root)
    hybridray status local                                # sites, nodes, CPUs, price per hour
    hybridray status local --watch                        # live: + work, bytes, cost so far
    eval "$(hybridray env local)"; ray job submit -- python jobs/x.py
    hybridray down local

A cluster you run yourself is recorded with ``hybridray attach`` (commands/attach.py); every
command here then works on it too, except ``down`` (``detach`` forgets it instead).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import time
from pathlib import Path
from typing import Any

from hybridray import cluster
from hybridray.cluster.plan import plan_nodes
from hybridray.cluster.state import cluster_dir
from hybridray.commands.validate import one_file, split_overrides
from hybridray.exceptions import ClusterNotFound, ConfigError
from hybridray.topology import load_topology


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up", help="start a cluster file's sites as a real Ray cluster on this machine",
        description="Start one `ray start` process per node (head, then min_nodes of every "
                    "pool), each labelled with its site. Arguments containing '=' are "
                    "key.path=value overrides, e.g. name=local2.")
    p.add_argument("items", nargs="+", metavar="FILE|key=value")
    p.add_argument("--simulate", action="store_true",
                   help="run every site (also cloud and on-prem ones) as local processes: "
                        "one node per pool, at most 2 CPUs and a 100 MB object store each")
    p.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                   help="do not start the Ray dashboard (ray job submit needs it)")
    p.add_argument("--port", type=int, help="GCS port (default: a free one)")
    p.add_argument("--dashboard-port", type=int, help="dashboard port (default: a free one)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds each node may take to register (default: 60)")
    p.add_argument("--tls", action="store_true",
                   help="run Ray's gRPC TLS (mutual): a CA and a certificate for this machine "
                        "are made in the cluster's state directory, unless --tls-cert, "
                        "--tls-key and --tls-ca give ones from hybridray certs")
    p.add_argument("--tls-cert", help="this machine's certificate (with --tls)")
    p.add_argument("--tls-key", help="its key (with --tls)")
    p.add_argument("--tls-ca", help="the cluster CA certificate that signed it (with --tls)")
    p.add_argument("--hosts", choices=("local", "netns"), default="local",
                   help="local: every node a process on this machine (default). netns: "
                        "every node a host of its own in a Linux network namespace, sites "
                        "joined by links shaped to their declared bandwidth, started by the "
                        "rendered join scripts with token auth and mutual TLS (needs root)")
    p.set_defaults(func=run_up)

    p = sub.add_parser("down", help="stop a cluster started by hybridray up",
                       description="Stop every node of a cluster, workers first, then the head.")
    p.add_argument("items", nargs="+", metavar="NAME|FILE [key=value]",
                   help="a cluster name, or the cluster file (and overrides) it was started from")
    p.set_defaults(func=run_down)

    p = sub.add_parser("status", help="show clusters, or one cluster's sites, nodes and cost")
    p.add_argument("name", nargs="?", help="a cluster name (default: list every cluster)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--watch", action="store_true",
                   help="a live view of one cluster: sites, nodes, utilisation, trainings, "
                        "services, syncs, bytes between sites, cost rate (Ctrl-C to stop)")
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between refreshes with --watch (default 2)")
    p.add_argument("--count", type=int, default=None,
                   help="with --watch: stop after this many refreshes")
    p.set_defaults(func=run_status)

    p = sub.add_parser("env", help="print the shell exports that point Ray at a cluster",
                       description='Use as: eval "$(hybridray env NAME)"')
    p.add_argument("name", metavar="NAME|FILE")
    p.set_defaults(func=run_env)


def _console() -> Any:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
        console.width = max(console.width, 140)
    return console


def run_up(args: argparse.Namespace) -> int:
    path, overrides = one_file(args.items, "cluster file", "hybridray up clusters/local.yaml")
    topology = load_topology(path, overrides)
    if args.hosts == "netns":
        from hybridray.cluster import netns

        netns.require_support()  # one clear refusal without root, before anything else
    nodes = plan_nodes(topology, simulate=args.simulate)  # refuses non-local sites up front
    tls = _tls_option(args)
    running = _already_up(topology, path, overrides, args, tls)
    if running is not None:
        print(f"cluster {running.name!r} is already up from {path} with these overrides "
              f"(since {running.created_at}, GCS {running.address}); nothing to start. "
              f"To start it afresh: hybridray down {running.name}, then up again")
        print(f"connect a shell:  eval \"$(hybridray env {running.name})\"")
        _print_env(running)
        return 0
    where = " as network-namespace hosts" if args.hosts == "netns" else ""
    print(f"starting cluster {topology.name!r}: {len(nodes)} nodes at {len(topology.sites)} "
          f"sites{where}{' (simulated)' if args.simulate else ''}", flush=True)
    started = time.monotonic()
    # SIGTERM (e.g. from `timeout`) stops what was started, as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        state = cluster.up(topology, source_file=path, overrides=overrides,
                           simulate=args.simulate, dashboard=args.dashboard, port=args.port,
                           dashboard_port=args.dashboard_port, timeout=args.timeout,
                           progress=lambda line: print(line, flush=True), tls=tls,
                           hosts=args.hosts)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"cluster {state.name!r} is up in {time.monotonic() - started:.1f}s "
          f"(GCS {state.address}; state in {state.state_dir})")
    print(f"connect a shell:  eval \"$(hybridray env {state.name})\"")
    _print_env(state)
    return 0


def _already_up(topology: Any, path: str, overrides: list[str], args: argparse.Namespace,
                tls: bool | dict[str, str]) -> cluster.ClusterState | None:
    """The running cluster when ``up`` asks for exactly what runs (same name, file,
    overrides and options, every node alive): running ``up`` twice is then harmless, as a
    reader who follows two documents that both start with it expects. Anything else is
    left to ``cluster.up``, which refuses a different or half-dead cluster of that name."""
    try:
        state = cluster.load_state(topology.name)
    except ClusterNotFound:
        return None
    added = [o for o in state.overrides[len(overrides):]
             if re.match(r"^sites\.[^.]+\.storage\.endpoint=", o)]   # the S3 server's
    same = (state.source_file == str(Path(path).absolute())
            and state.overrides == [*overrides, *added]
            and state.simulate == args.simulate and state.dashboard == args.dashboard
            and bool(state.netns) == (args.hosts == "netns")
            and bool(state.tls) == bool(tls) and not isinstance(tls, dict)
            and args.port in (None, state.ports.get("gcs"))
            and args.dashboard_port in (None, state.ports.get("dashboard"))
            and state.nodes and len(state.alive_nodes()) == len(state.nodes))
    return state if same else None


def _tls_option(args: argparse.Namespace) -> bool | dict[str, str]:
    files = {"RAY_TLS_SERVER_CERT": args.tls_cert, "RAY_TLS_SERVER_KEY": args.tls_key,
             "RAY_TLS_CA_CERT": args.tls_ca}
    given = [k for k, v in files.items() if v]
    if given and (len(given) < 3 or not args.tls):
        raise ConfigError("give --tls with all three of --tls-cert, --tls-key and --tls-ca "
                          "(from hybridray certs), or --tls alone for a CA of the cluster's own")
    return files if given else bool(args.tls)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _name_of(items: list[str]) -> str:
    files, overrides = split_overrides(items)
    if len(files) != 1:
        raise ConfigError("give one cluster name or file, e.g. hybridray down local")
    target = files[0]
    if overrides or Path(target).is_file() or target.endswith((".yaml", ".yml")):
        return load_topology(target, overrides).name
    return target


def run_down(args: argparse.Namespace) -> int:
    name = _name_of(args.items)
    try:
        state = cluster.load_state(name)
    except ClusterNotFound:
        state = None
    started = time.monotonic()
    stopped = cluster.down(name)  # raises ClusterNotFound for a name never recorded
    if stopped:
        print(f"stopped cluster {name!r}: {len(stopped)} node process(es) "
              f"(pids {', '.join(map(str, stopped))}) in {time.monotonic() - started:.1f}s")
    else:
        print(f"cluster {name!r} was already down; nothing to stop")
    if state is not None and state.netns:
        from hybridray.cluster import netns

        rec = netns.NetRecord.from_json(state.netns)
        left = netns.inventory(rec.prefix)
        made = {k: sum(1 for m in rec.made if m["kind"] == k) for k in ("netns", "link")}
        print(f"removed {made['netns']} network namespace(s) and {made['link']} link(s) "
              f"(bridges, veths, uplinks and their qdiscs; prefix {rec.prefix}); "
              f"{len(left['netns']) + len(left['links'])} left")
    if state is not None:
        print(f"node logs kept in {state.state_dir / 'logs'}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    if args.watch:
        from hybridray.commands.watch import watch

        if args.name is None or args.json:
            raise ConfigError("--watch shows one cluster live: hybridray status NAME --watch "
                              "(without --json)")
        return watch(args.name, interval=args.interval, count=args.count)
    if args.name is None:
        rows = cluster.cluster_summaries()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_clusters(rows)
        return 0
    try:
        report = cluster.status(args.name)
    except ClusterNotFound:
        if not cluster_dir(args.name).is_dir():
            raise
        report = {"name": args.name, "state": "down"}  # down ran; only its logs remain
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"cluster {args.name!r} is down (logs in {cluster_dir(args.name) / 'logs'})")
        return 0
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
    return 0


def run_env(args: argparse.Namespace) -> int:
    state = cluster.load_state(_name_of([args.name]))
    _print_env(state)
    return 0


def _print_env(state: cluster.ClusterState) -> None:
    for key, value in cluster.ray_env(state).items():
        print(f"export {key}={shlex.quote(value)}")
    if state.netns:
        from hybridray.cluster.nshosts import head_namespace

        ns = head_namespace(state)
        print(f"export HYBRIDRAY_HEAD_NETNS={ns}")
        print('# namespace hosts: Python drivers run on the head host: ip netns exec '
              '"$HYBRIDRAY_HEAD_NETNS" python SCRIPT.py (hybridray commands move there '
              "themselves)")
    if state.dashboard_url:
        print(f"# submit a job:  ray job submit --address {state.dashboard_url} "
              "--working-dir . -- python jobs/SCRIPT.py")
    else:
        print(f"# no dashboard (started with --no-dashboard), so no ray job submit; drivers "
              f"connect with ray.init(address={state.address!r})")


def _print_clusters(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    console = _console()
    if not rows:
        console.print("no clusters recorded; start one with: hybridray up clusters/local.yaml")
        return
    table = Table(title="hybridray clusters")
    for col in ("name", "state", "nodes alive", "sites", "$/hour", "GCS", "dashboard",
                "started"):
        table.add_column(col, justify="right" if col in ("nodes alive", "$/hour") else "left")
    for r in rows:
        if r["state"] == "unreadable":
            table.add_row(r["name"], "[red]unreadable[/]", "", "", "", r["error"], "", "")
            continue
        if r["state"] == "attached":
            table.add_row(r["name"], "[cyan]attached[/]", f"{r['nodes']} members",
                          ", ".join(r["sites"]), "-", r["address"], r["dashboard_url"] or "-",
                          r["created_at"])
            continue
        table.add_row(r["name"], _state(r["state"]) + (" (sim)" if r["simulate"] else ""),
                      f"{r['nodes_alive']}/{r['nodes']}", ", ".join(r["sites"]),
                      f"{r['price_per_hour']:.2f}", r["address"], r["dashboard_url"] or "-",
                      r["created_at"])
    console.print(table)


def _pools_cell(pools: dict[str, Any]) -> str:
    """``cpu 1`` for a static pool, ``cpu 1 (0..2)`` for an elastic one."""
    return ", ".join(f"{name} {p['running']}" + (f" ({p['min']}..{p['max']})" if p["elastic"]
                                                 else "") for name, p in pools.items())


def _state(state: str) -> str:
    color = {"up": "green", "degraded": "yellow"}.get(state, "red")
    return f"[{color}]{state}[/]"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _print_status(report: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    sim = " (simulated)" if report["simulate"] else ""
    sim += " (attached)" if report.get("origin") == "attach" else ""
    console.print(f"cluster [bold]{report['name']}[/] is {_state(report['state'])}{sim}: "
                  f"GCS {report['address']}, dashboard {report['dashboard_url'] or 'off'}")
    for site in report.get("partitioned", []):
        console.print(f"[yellow]site {site} is cut off (hybridray fault partition); heal it "
                      f"with: hybridray fault heal {report['name']} {site}[/]")
    if not report["gcs"]["reachable"]:
        console.print(f"[yellow]GCS not reachable ({report['gcs']['error']}); "
                      + ("nothing below is live[/]" if report.get("origin") == "attach" else
                         "liveness below is from the processes only[/]"))
    sites = Table(title="sites")
    for col in ("site", "kind", "pools", "nodes alive", "CPU used/total", "GPU used/total",
                "$/hour", "spent $", "node-hours"):
        sites.add_column(col, justify="left" if col in ("site", "kind", "pools") else "right")
    cost = report.get("cost", {})
    for name, s in report["sites"].items():
        c = cost.get(name, {"compute": 0.0, "node_seconds": 0.0})
        sites.add_row(name, s["kind"] or "?", _pools_cell(s.get("pools", {})),
                      f"{s['alive']}/{s['nodes']}",
                      f"{_num(s['cpus_used'])}/{_num(s['cpus_total'])}",
                      f"{_num(s['gpus_used'])}/{_num(s['gpus_total'])}",
                      f"{s['price_per_hour']:.2f}", f"{c['compute']:.4f}",
                      f"{c['node_seconds'] / 3600:.3f}")
    spent = sum(c["compute"] for c in cost.values())
    sites.add_row("[bold]total[/]", "", "", "", "", "", f"[bold]{report['price_per_hour']:.2f}[/]",
                  f"[bold]{spent:.4f}[/]", "")
    console.print(sites)
    nodes = Table(title="nodes")
    for col in ("node", "site", "pool", "pid", "process", "GCS", "CPU used/total", "node id"):
        nodes.add_column(col)
    for n in report["nodes"]:
        gcs = {None: "?", True: "[green]alive[/]", False: "[red]dead[/]"}[n["gcs_alive"]]
        process = {None: "-", True: "[green]alive[/]", False: "[red]dead[/]"}[
            n["process_alive"]]
        pool = (n["pool"] or "(head)") + (" (autoscaled)" if n.get("elastic") else "")
        nodes.add_row(n["key"], n["site"], pool,
                      "-" if n["pid"] is None else str(n["pid"]), process, gcs,
                      f"{_num(n['cpus_used'])}/{_num(n['cpus_total'])}",
                      (n["node_id"] or "-")[:12])
    console.print(nodes)
    scaler = report.get("autoscaler")
    if scaler:
        launching = [f"{r['count']} {r['node_type']}" for r in scaler["pending_launches"]]
        launching += [f"1 {i['node_type']} (starting)" for i in scaler["pending_instances"]]
        console.print("Ray's autoscaler: " + (f"launching {', '.join(launching)}" if launching
                                               else "no launch pending")
                      + (f"; {len(scaler['infeasible'])} request shape(s) no node type can "
                         "serve" if scaler["infeasible"] else ""))
    for d in report.get("drift", []):
        console.print(f"[red]DRIFT[/] node {d['node_id'][:12]} (site {d['site'] or '?'}): "
                      f"{'; '.join(d['reasons'])}; never placed on")
    if report.get("drift"):
        console.print(f"admit a node that belongs: hybridray admit {report['name']} NODE_ID; "
                      "remove the others from the cluster")
