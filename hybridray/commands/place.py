"""``hybridray place`` (decide where a workload may run, show the Ray options) and ``audit``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from hybridray.audit import AuditLog, describe
from hybridray.exceptions import ConfigError, HybridRayError
from hybridray.placement import compile as C
from hybridray.placement.policy import decide
from hybridray.placement.workload import Preference, Workload, WorkloadKind
from hybridray.topology import Topology, load_topology


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "place", help="decide where a workload may run and print the Ray options",
        description="Apply the placement policy to one workload. TARGET is a cluster file "
                    "(with optional key=value overrides) or the name of a running cluster "
                    "(then live capacity is used with --live).")
    p.add_argument("target", metavar="FILE|NAME")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--name", default="cli-workload")
    p.add_argument("--kind", choices=[k.value for k in WorkloadKind], default="task")
    p.add_argument("--cpus", type=float, default=1.0)
    p.add_argument("--gpus", type=float, default=0.0)
    p.add_argument("--accelerator")
    p.add_argument("--count", type=int, default=1, help="units: workers or replicas")
    p.add_argument("--data-class", action="append", default=[], dest="data_classes",
                   metavar="CLASS", help="a data class it touches (repeatable)")
    p.add_argument("--data-site", help="site where its input data lives")
    p.add_argument("--data-bytes", type=int, default=0)
    p.add_argument("--hours", type=float, default=1.0, dest="expected_hours")
    p.add_argument("--prefer", choices=[x.value for x in Preference], default="cheapest")
    p.add_argument("--site", help="run at this site (implies --prefer site)")
    p.add_argument("--no-burst", action="store_true", help="never fall back to other sites")
    p.add_argument("--no-spot", action="store_true", help="never use spot pools")
    p.add_argument("--live", action="store_true", help="use the running cluster's capacity")
    p.add_argument("--queue", action="store_true",
                   help="with --live: wait for room that actors hold instead of a refusal")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_place)

    a = sub.add_parser("audit", help="show a cluster's audit log",
                       description="Print audit records, one line each in local time with "
                                   "the fields that matter: placements (workload, shape, "
                                   "class, sites), refusals (rule, message, fix), transfers "
                                   "(src → dst, bytes, cost), syncs, trainings.")
    a.add_argument("cluster", metavar="NAME")
    a.add_argument("--event", help="only this event (placement, refusal, transfer, sync, "
                                   "train-start, train-end, verify)")
    a.add_argument("--tail", type=int, default=20, help="last N records (0: all)")
    a.add_argument("--json", action="store_true", help="JSON lines")
    a.set_defaults(func=run_audit)


def _drain(name: str) -> None:
    """Bring in records queued inside the cluster (e.g. guard refusals on drift nodes)."""
    from hybridray.cluster import mirror
    from hybridray.cluster.state import load_state

    try:
        state = load_state(name)
    except HybridRayError:
        return   # down, or never recorded: the log on disk is all there is
    mirror.drain(state)


def _resolve(target: str, overrides: list[str]) -> tuple[Topology, object | None]:
    """A cluster file, or the recorded topology of a cluster brought up by name."""
    if Path(target).is_file() or target.endswith((".yaml", ".yml")):
        return load_topology(target, overrides), None
    from hybridray import cluster as lifecycle

    state = lifecycle.load_state(target)
    return state.topology(), state


def _workload(args: argparse.Namespace) -> Workload:
    fields = dict(name=args.name, kind=args.kind, cpus=args.cpus, gpus=args.gpus,
                  accelerator=args.accelerator, count=args.count,
                  data_classes=tuple(args.data_classes), data_site=args.data_site,
                  data_bytes=args.data_bytes, expected_hours=args.expected_hours,
                  preference=args.prefer, site=args.site, burst=not args.no_burst,
                  spot_ok=not args.no_spot, queue=args.queue)
    try:
        return Workload(**fields)
    except ValidationError as e:
        raise ConfigError([f"workload: --{'-'.join(str(x) for x in err['loc']).replace('_', '-')}"
                           f": {err['msg']}" for err in e.errors(include_url=False)]) from None


def run_place(args: argparse.Namespace) -> int:
    topology, state = _resolve(args.target, args.overrides)
    wl = _workload(args)
    capacity = None
    if args.live:
        if state is None:
            raise ConfigError("--live needs the name of a running cluster, not a file")
        import hybridray

        capacity = hybridray.connect(topology.name).capacity()
    placement = decide(topology, wl, capacity)
    AuditLog.for_cluster(topology.name).placement(placement, cluster=topology.name,
                                                  source="cli")
    if args.json:
        out = placement.summary()
        if placement.ok:
            out["ray_options"] = C.task_options(placement)
            out["assign"] = placement.assign()
        print(json.dumps(out, indent=2))
    else:
        _print_placement(placement)
    if not placement.ok:
        placement.raise_if_refused()
    return 0


def _print_placement(placement) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    wl = placement.workload
    console.print(f"[bold]{wl.name}[/]: {wl.kind.value}, {wl.count} x ({wl.cpus:g} CPU, "
                  f"{wl.gpus:g} GPU), data class {wl.data_class.value}, prefer "
                  f"{wl.preference.value}")
    if placement.ok:
        table = Table("#", "site", "pool", "est. cost", "reason")
        for i, c in enumerate(placement.candidates):
            table.add_row(str(i + 1), c.site, c.pool, f"${c.est_cost:.2f}", c.reason)
        console.print(table)
        console.print("workers/replicas per site: " + ", ".join(
            f"{s}={placement.assign().count(s)}" for s in dict.fromkeys(placement.assign())))
        console.print("Ray options: " + json.dumps(C.task_options(placement)))
    for site, why in placement.excluded.items():
        console.print(f"  [dim]not {site}: {why}[/]")


def run_audit(args: argparse.Namespace) -> int:
    _drain(args.cluster)
    log = AuditLog.for_cluster(args.cluster)
    if not log.path.exists():
        raise HybridRayError(
            f"no audit log for cluster {args.cluster!r} at {log.path}; decisions are "
            "recorded once work is placed on it")
    records = log.read(args.event)
    if args.tail:
        records = records[-args.tail:]
    if args.json:
        for rec in records:
            print(json.dumps(rec))
        return 0
    if not records:
        print(f"no {args.event + ' ' if args.event else ''}records for {args.cluster!r} "
              f"in {log.path}")
        return 0
    for rec in records:
        print(describe(rec))
    return 0
