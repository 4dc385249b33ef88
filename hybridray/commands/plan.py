"""``hybridray plan FILE [key=value…] --demand CLASS:gpu=N,cpu=N …``: the cheapest allocation.

Prints the optimal allocation of the demand across sites, then its cost beside the on-prem-only
and cloud-only plans. Exits 2 with the binding constraint when the demand cannot be met.

    hybridray plan clusters/onprem-aws.yaml --demand restricted:gpu=800 --demand internal:gpu=2000
    hybridray plan clusters/onprem-aws.yaml --demand-file demand.yaml --hours 168 --json

A demand file (``--demand-file``) holds the same as ``--demand`` flags::

    hours: 720                     # optional, default 720 (a month)
    classes:
      restricted: {gpu_hours: 800, cpu_hours: 2000}
      internal: {gpu_hours: 2000}
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hybridray.commands.validate import one_file
from hybridray.exceptions import ConfigError, PlanInfeasible
from hybridray.planner import Demand, Plan, compare
from hybridray.topology import DataClass, load_topology
from hybridray.topology.loader import safe_yaml

EXAMPLE = "--demand restricted:gpu=800,cpu=2000"
_KEYS = {"cpu": "cpu_hours", "gpu": "gpu_hours", "cpu_hours": "cpu_hours",
         "gpu_hours": "gpu_hours"}
_CLASS_NAMES = [c.value for c in DataClass]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="cheapest allocation of CPU/GPU-hours across sites",
        description="Solve for the cheapest allocation of a demand (CPU- and GPU-hours per data "
                    "class) within capacity and residency, and compare it with on-prem-only "
                    "and cloud-only plans. Arguments containing '=' are key.path=value "
                    "overrides of the cluster file.",
        epilog=f"example: hybridray plan clusters/onprem-aws.yaml {EXAMPLE} "
               "--demand internal:gpu=2000")
    p.add_argument("items", nargs="+", metavar="FILE|key=value")
    p.add_argument("--demand", action="append", default=[], metavar="CLASS:gpu=N,cpu=N",
                   help="CPU-/GPU-hours for one data class; repeat for more classes")
    p.add_argument("--demand-file", metavar="YAML",
                   help="a file with hours and classes.<class>.{cpu_hours,gpu_hours}")
    p.add_argument("--hours", metavar="H",
                   help="horizon in hours over which capacity is available (default 720)")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path, overrides = one_file(args.items, "cluster file",
                               f"hybridray plan clusters/onprem-aws.yaml {EXAMPLE}")
    topology = load_topology(path, overrides)
    demand = build_demand(args.demand, args.demand_file, args.hours)
    plans = compare(topology, demand)
    best = plans["optimal"]
    if args.json:
        print(json.dumps({"cluster": topology.name, "hours": demand.hours,
                          "demand": demand.model_dump(mode="json")["classes"],
                          "plans": {k: _as_json(v) for k, v in plans.items()}}, indent=2))
    if isinstance(best, PlanInfeasible):
        raise best
    if not args.json:
        _print(topology.name, best, plans)
    return 0


# --------------------------------------------------------------------------- demand parsing


def build_demand(specs: list[str], demand_file: str | None, hours: str | None) -> Demand:
    """Validate ``--demand`` strings, a ``--demand-file`` and ``--hours`` into one ``Demand``.

    Flags win over the file for the same class and resource. Raises ``ConfigError`` listing
    every problem, each naming the flag or key and the fix.
    """
    data: dict[str, Any] = {}
    label = "--demand"
    if demand_file:
        label = demand_file
        path = Path(demand_file)
        if not path.is_file():
            raise ConfigError(f"{demand_file}: no such file; pass a YAML demand file "
                              "(see `hybridray plan --help`)")
        data = safe_yaml(path.read_text(encoding="utf-8"), demand_file)
    problems: list[str] = []
    from_flags = parse_demand_specs(specs, problems)
    if hours is not None:
        try:
            data["hours"] = float(hours)
        except ValueError:
            data["hours"] = math.nan
        if not 0 < data["hours"] <= 87_600:  # also refuses nan
            problems.append(f"--hours {hours}: must be a number of hours above 0 and at most "
                            "87600 (ten years), e.g. --hours 720")
    if problems:
        raise ConfigError(problems)
    if from_flags:
        classes = data.setdefault("classes", {})
        if not isinstance(classes, dict):
            raise ConfigError(f"{label}: classes: must be a mapping of data class to "
                              "{cpu_hours, gpu_hours}")
        for name, values in from_flags.items():
            current = classes.get(name)
            classes[name] = {**(current if isinstance(current, dict) else {}), **values}
    if not data.get("classes"):
        raise ConfigError(f"no demand given; add {EXAMPLE} (repeatable) or --demand-file "
                          "demand.yaml")
    try:
        return Demand.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_problem(label, err) for err in e.errors(include_url=False)]) \
            from None


def parse_demand_specs(specs: list[str], problems: list[str]) -> dict[str, dict[str, float]]:
    """``["restricted:gpu=800,cpu=2000"]`` → ``{"restricted": {"gpu_hours": 800, ...}}``.

    Problems are appended to ``problems`` (all of them, not just the first).
    """
    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        where = f"--demand {spec!r}"
        name, sep, rest = spec.partition(":")
        name = name.strip()
        if not sep or not rest.strip():
            problems.append(f"{where}: expected CLASS:gpu=N,cpu=N, e.g. {EXAMPLE}")
            continue
        if name not in _CLASS_NAMES:
            problems.append(f"{where}: {_unknown_class(name)}")
            continue
        values = out.setdefault(name, {})
        for item in rest.split(","):
            key, eq, raw = (s.strip() for s in item.partition("="))
            field = _KEYS.get(key)
            if not eq or field is None:
                problems.append(f"{where}: {item.strip()!r} is not gpu=N or cpu=N (N in "
                                f"GPU- or CPU-hours), e.g. {EXAMPLE}")
                continue
            unit = "GPU-hours" if field == "gpu_hours" else "CPU-hours"
            try:
                value = float(raw)
            except ValueError:
                problems.append(f"{where}: {key} must be a number of {unit} (got {raw!r}), "
                                f"e.g. {name}:{key}=800")
                continue
            if not math.isfinite(value) or value < 0:
                problems.append(f"{where}: {key} must be a finite number >= 0 of {unit} "
                                f"(got {raw}); remove it if the class needs none")
                continue
            if field in values:
                problems.append(f"{where}: {name} {key} is given twice; give it once")
                continue
            values[field] = value
    return out


def _unknown_class(name: str) -> str:
    close = difflib.get_close_matches(name, _CLASS_NAMES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown data class {name!r}{hint} (use one of: {', '.join(_CLASS_NAMES)})"


def _problem(label: str, err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"] if p != "[key]"]
    path = ".".join(loc) or "<root>"
    etype, msg = err["type"], err["msg"]
    if etype == "enum" and len(loc) == 2 and loc[0] == "classes":
        msg = _unknown_class(loc[1])
    elif etype == "extra_forbidden":
        model = Demand if len(loc) == 1 else None
        allowed = list(model.model_fields) if model else ["cpu_hours", "gpu_hours"]
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        msg = f"unknown key{hint} (allowed here: {', '.join(allowed)})"
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return f"{label}: {path}: {msg}"


# --------------------------------------------------------------------------- output


def _as_json(result: Plan | PlanInfeasible) -> dict[str, Any]:
    if isinstance(result, PlanInfeasible):
        return {"status": "infeasible", "binding": result.binding}
    return result.to_dict()


def _money(x: float) -> str:
    return f"${x:,.2f}"


def summary_line(plans: dict[str, Plan | PlanInfeasible]) -> str:
    """``optimal $X vs on-prem-only $Y (+Z%) vs cloud-only infeasible: why``."""
    best = plans["optimal"]
    parts = []
    for scope, result in plans.items():
        label = "on-prem-only" if scope == "onprem-only" else scope
        if isinstance(result, PlanInfeasible):
            why = result.binding[0] if result.binding else str(result)
            more = f" (+{len(result.binding) - 1} more)" if len(result.binding) > 1 else ""
            parts.append(f"{label} infeasible: {why}{more}")
            continue
        text = f"{label} {_money(result.cost)}"
        if scope != "optimal" and isinstance(best, Plan) and best.cost > 0:
            text += f" ({(result.cost / best.cost - 1) * 100:+.0f}%)"
        parts.append(text)
    return " vs ".join(parts)


def _print(cluster: str, best: Plan, plans: dict[str, Plan | PlanInfeasible]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Outside a terminal (pipes, CI logs) rich would assume 80 columns and cut names short.
    console = Console(file=sys.stdout, soft_wrap=True,
                      width=None if sys.stdout.isatty() else 120)
    table = Table(title=f"{cluster}: cheapest plan over {best.demand.hours:g} h")
    for col in ("Site", "Pool", "Class"):
        table.add_column(col)
    for col in ("Node-hours", "CPU-hours", "GPU-hours", "Cost"):
        table.add_column(col, justify="right")
    for a in best.allocations:
        table.add_row(a.site, a.pool, a.data_class.value, f"{a.node_hours:,.1f}",
                      f"{a.cpu_hours:,.0f}", f"{a.gpu_hours:,.0f}", _money(a.cost))
    table.add_section()
    table.add_row("total", "", "", f"{sum(a.node_hours for a in best.allocations):,.1f}",
                  f"{sum(a.cpu_hours for a in best.allocations):,.0f}",
                  f"{sum(a.gpu_hours for a in best.allocations):,.0f}", _money(best.cost))
    console.print(table)
    by_site = " · ".join(f"{s} {_money(c)}" for s, c in best.cost_by_site().items())
    by_class = " · ".join(f"{c} {_money(v)}" for c, v in best.cost_by_class().items())
    console.print(f"by site: {by_site or '-'}", markup=False, highlight=False)
    console.print(f"by class: {by_class or '-'}", markup=False, highlight=False)
    console.print(summary_line(plans), markup=False, highlight=False)
