"""The cost planner: the cheapest way to run a demand of CPU- and GPU-hours across sites.

A month of work per data class is a linear program, not a sorting problem: restricted work can
only run on-prem, so the cheap on-prem GPUs must be kept for it even when public work would
also like them, and a GPU node-hour bought for GPU demand brings its CPUs along. A greedy
cheapest-first fill gets such trades wrong; SciPy's HiGHS solves the exact problem in
milliseconds for hundreds of pools.

The program has one variable per (pool, data class) that the pool's site may hold (deny by
default: no variable, no placement), measured in node-hours::

    minimise    sum price[p] * y[p, c]
    subject to  sum_p cpus[p] * y[p, c] >= cpu_hours[c]        for each class c
                sum_p gpus[p] * y[p, c] >= gpu_hours[c]        for each class c
                sum_c y[p, c]           <= max_nodes[p] * hours  for each pool p
                y >= 0

Node-hours are continuous (a month-scale plan, not a schedule), and a node-hour is billed at
``price_per_node_hour`` whether the site is a cloud or an amortised on-prem room.

When the demand cannot be met, ``PlanInfeasible.binding`` says which constraint binds:
residency (no site may hold the class), one class's capacity, several classes sharing the same
pools, or, when only the interplay of CPUs and GPUs on the same nodes explains it, the minimal
set of demands that conflict, found with an elastic (slack-penalised) version of the program.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import sparse
from scipy.optimize import linprog

from hybridray.exceptions import HybridRayError, PlanInfeasible
from hybridray.topology.models import DataClass, SiteKind, Topology

HOURS_PER_MONTH = 720.0
RESOURCES = ("cpu", "gpu")
_HOURS = {"cpu": "CPU-hours", "gpu": "GPU-hours"}
_UNITS = {"cpu": "CPUs", "gpu": "GPUs"}
_UPPER = {"cpu": "CPU", "gpu": "GPU"}
# A tiny cost per node-hour so that free (price 0) pools are not filled beyond the demand.
_TIE_BREAK = 1e-7

# The plans ``compare`` makes, and the site kinds each may use (None: all sites).
SCOPES: dict[str, frozenset[SiteKind] | None] = {
    "optimal": None,
    "onprem-only": frozenset({SiteKind.onprem, SiteKind.private}),
    "cloud-only": frozenset({SiteKind.cloud}),
}


# --------------------------------------------------------------------------- demand


class ClassDemand(BaseModel):
    """What one data class needs over the horizon."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    cpu_hours: float = Field(0.0, ge=0, description="CPU-hours needed (any pool's CPUs count).")
    gpu_hours: float = Field(0.0, ge=0, description="GPU-hours needed.")


class Demand(BaseModel):
    """CPU- and GPU-hours per data class, to be met within ``hours`` of wall-clock time.

    Example::

        Demand(hours=720, classes={"restricted": {"gpu_hours": 800, "cpu_hours": 2000}})
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    hours: float = Field(HOURS_PER_MONTH, gt=0, le=87_600,
                         description="Horizon in hours over which pool capacity is available.")
    classes: dict[DataClass, ClassDemand] = Field(
        default_factory=dict, description="Demand per data class.")

    def need(self, data_class: DataClass, resource: str) -> float:
        """CPU- (``resource="cpu"``) or GPU-hours needed for ``data_class``."""
        d = self.classes.get(data_class)
        return 0.0 if d is None else float(getattr(d, f"{resource}_hours"))


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Allocation:
    """Node-hours of one pool given to one data class, and what they provide and cost."""

    site: str
    pool: str
    data_class: DataClass
    node_hours: float
    cpu_hours: float
    gpu_hours: float
    cost: float


@dataclass(frozen=True)
class Plan:
    """The cheapest allocation of a demand over ``sites`` (the sites the plan could use)."""

    scope: str
    sites: tuple[str, ...]
    demand: Demand
    allocations: tuple[Allocation, ...]
    cost: float

    def cost_by_site(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for a in self.allocations:
            out[a.site] = out.get(a.site, 0.0) + a.cost
        return out

    def cost_by_class(self) -> dict[DataClass, float]:
        out: dict[DataClass, float] = {}
        for a in self.allocations:
            out[a.data_class] = out.get(a.data_class, 0.0) + a.cost
        return out

    def to_dict(self) -> dict:
        """A JSON-ready view (``hybridray plan --json``)."""
        return {
            "status": "optimal",
            "scope": self.scope,
            "sites": list(self.sites),
            "hours": self.demand.hours,
            "cost": round(self.cost, 2),
            "cost_by_site": {k: round(v, 2) for k, v in self.cost_by_site().items()},
            "cost_by_class": {k.value: round(v, 2) for k, v in self.cost_by_class().items()},
            "allocations": [
                {"site": a.site, "pool": a.pool, "class": a.data_class.value,
                 "node_hours": round(a.node_hours, 3), "cpu_hours": round(a.cpu_hours, 3),
                 "gpu_hours": round(a.gpu_hours, 3), "cost": round(a.cost, 2)}
                for a in self.allocations
            ],
        }


def plan(topology: Topology, demand: Demand, *, sites: Collection[str] | None = None,
         scope: str = "optimal") -> Plan:
    """The cheapest allocation of ``demand`` within capacity and residency.

    Args:
        topology: the cluster.
        demand: CPU- and GPU-hours per data class over ``demand.hours``.
        sites: only plan on these sites (default: all).
        scope: a label for the plan and its errors, e.g. ``"cloud-only"``.

    Raises:
        PlanInfeasible: the demand cannot be met; ``binding`` says which constraint binds.
    """
    model = _Model(topology, demand, sites, scope)
    if not model.rows:
        return Plan(scope, model.scope_sites, demand, (), 0.0)
    res = model.solve() if len(model.var_pool) else None
    if res is None or res.status == 2:
        where = "" if scope == "optimal" else f" in the {scope} plan"
        raise PlanInfeasible(
            f"the demand cannot be met within capacity and residency{where}",
            _explain(model))
    if res.status != 0:
        raise HybridRayError(f"the LP solver failed ({scope}): {res.message}")
    return model.to_plan(res.x)


def compare(topology: Topology, demand: Demand) -> dict[str, Plan | PlanInfeasible]:
    """The optimal plan beside the on-prem-only and cloud-only plans.

    Returns a dict with keys ``"optimal"``, ``"onprem-only"`` and ``"cloud-only"``; a plan
    that cannot meet the demand is a ``PlanInfeasible`` (not raised) whose ``binding`` says why.
    """
    out: dict[str, Plan | PlanInfeasible] = {}
    for scope, kinds in SCOPES.items():
        names = [n for n, s in topology.sites.items() if kinds is None or s.kind in kinds]
        try:
            out[scope] = plan(topology, demand, sites=names, scope=scope)
        except PlanInfeasible as e:
            out[scope] = e
    return out


# --------------------------------------------------------------------------- the LP


@dataclass(frozen=True)
class _Pool:
    site: str
    name: str
    cpus: float
    gpus: int
    price: float
    node_hours: float  # capacity over the horizon
    max_class: DataClass

    def per_node(self, resource: str) -> float:
        return self.cpus if resource == "cpu" else float(self.gpus)


class _Model:
    """The program in sparse matrix form, plus what explaining it needs."""

    def __init__(self, topology: Topology, demand: Demand, sites: Collection[str] | None,
                 scope: str):
        if sites is not None:
            unknown = sorted(set(sites) - set(topology.sites))
            if unknown:
                raise KeyError(f"unknown site(s) {', '.join(unknown)}; this cluster has: "
                               f"{', '.join(topology.sites)}")
        self.topology, self.demand, self.scope = topology, demand, scope
        chosen = None if sites is None else set(sites)
        self.scope_sites = tuple(n for n in topology.sites if chosen is None or n in chosen)
        self.pools = [
            _Pool(n, p.name, p.cpus, p.gpus, p.price_per_node_hour, p.max_nodes * demand.hours,
                  topology.sites[n].max_data_class)
            for n in self.scope_sites for p in topology.sites[n].pools if p.max_nodes > 0
        ]
        # demand rows: (class, resource, amount), classes from public up
        self.rows = [(c, r, demand.need(c, r)) for c in DataClass for r in RESOURCES
                     if demand.need(c, r) > 0]
        active = sorted({c for c, _, _ in self.rows})
        var_pool, var_class = [], []
        for c in active:
            for i, p in enumerate(self.pools):
                if c <= p.max_class:
                    var_pool.append(i)
                    var_class.append(c.rank)
        self.var_pool = np.asarray(var_pool, dtype=np.int64)
        self.var_class = np.asarray(var_class, dtype=np.int64)
        per_node = {r: np.array([p.per_node(r) for p in self.pools], dtype=float)
                    for r in RESOURCES}
        self.price = np.array([p.price for p in self.pools], dtype=float)[self.var_pool]
        self.capacity = np.array([p.node_hours for p in self.pools], dtype=float)
        n = len(self.var_pool)
        # demand rows, written as -sum(coef * y) <= -need
        ri, ci, vals = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
        for k, (c, r, _) in enumerate(self.rows):
            cols = np.flatnonzero(self.var_class == c.rank)
            coef = per_node[r][self.var_pool[cols]]
            ri.append(np.full(np.count_nonzero(coef), k))
            ci.append(cols[coef > 0])
            vals.append(-coef[coef > 0])
        self.a_demand = sparse.csr_matrix(
            (np.concatenate(vals), (np.concatenate(ri), np.concatenate(ci))),
            shape=(len(self.rows), n))
        self.b_demand = -np.array([d for _, _, d in self.rows], dtype=float)
        self.a_capacity = sparse.csr_matrix(
            (np.ones(n), (self.var_pool, np.arange(n))), shape=(len(self.pools), n))

    def solve(self):
        a = sparse.vstack([self.a_demand, self.a_capacity], format="csr")
        b = np.concatenate([self.b_demand, self.capacity])
        return linprog(self.price + _TIE_BREAK, A_ub=a, b_ub=b, bounds=(0, None),
                       method="highs")

    def shortfall(self, keep: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """The elastic program: meet only demand rows ``keep``, each with a penalised slack.

        Returns the least shortfall per kept row (in its own unit, weighted by 1/demand so
        CPU- and GPU-hours compare) and the node-hours used per pool in that solution.
        """
        keep = list(keep)
        n = len(self.var_pool)
        a = self.a_demand[keep]
        slack = -sparse.identity(len(keep), format="csr")
        a = sparse.vstack([sparse.hstack([a, slack]),
                           sparse.hstack([self.a_capacity,
                                          sparse.csr_matrix((len(self.pools), len(keep)))])],
                          format="csr")
        b = np.concatenate([self.b_demand[keep], self.capacity])
        need = -self.b_demand[keep]
        cost = np.concatenate([np.zeros(n), 1.0 / need])
        res = linprog(cost, A_ub=a, b_ub=b, bounds=(0, None), method="highs")
        if res.status != 0:
            raise HybridRayError(f"the LP solver failed while explaining: {res.message}")
        used = np.bincount(self.var_pool, weights=res.x[:n], minlength=len(self.pools))
        return res.x[n:], used

    def to_plan(self, x: np.ndarray) -> Plan:
        allocations = []
        for j in np.flatnonzero(x > 1e-6):
            p = self.pools[self.var_pool[j]]
            y = float(x[j])
            allocations.append(Allocation(p.site, p.name, _CLASSES[self.var_class[j]], y,
                                          y * p.cpus, y * p.gpus, y * p.price))
        order = {name: i for i, name in enumerate(self.scope_sites)}
        allocations.sort(key=lambda a: (order[a.site], a.pool, -a.data_class.rank))
        return Plan(self.scope, self.scope_sites, self.demand, tuple(allocations),
                    sum(a.cost for a in allocations))


_CLASSES = list(DataClass)


# --------------------------------------------------------------------------- explanations


def _explain(model: _Model) -> list[str]:
    """Sentences naming the constraints that make the demand infeasible, each with a fix."""
    if not model.pools:
        what = f"sites ({_names(model.scope_sites)})" if model.scope_sites else "sites"
        return [f"the {model.scope} plan has no {what} with nodes to use; this cluster's "
                f"sites are {_names(model.topology.sites)}"]
    lines: list[str] = []
    demanded = sorted({c for c, _, _ in model.rows}, reverse=True)
    placeable = []
    for c in demanded:
        if any(c <= p.max_class for p in model.pools):
            placeable.append(c)
        else:
            lines.append(_no_site(model, c))
    for r in RESOURCES:
        worst_above = 0.0  # shortfall already explained by a more restricted group
        for c in placeable:  # most restricted first
            pools = [p for p in model.pools if c <= p.max_class]
            supply = sum(p.per_node(r) * p.node_hours for p in pools)
            alone = model.demand.need(c, r)
            if alone > supply * (1 + 1e-9) + 1e-9:
                lines.append(_short(model, [c], r, alone, pools, supply))
                worst_above = max(worst_above, alone - supply)
                continue
            group = [g for g in placeable if g >= c and model.demand.need(g, r) > 0]
            together = sum(model.demand.need(g, r) for g in group)
            gap = together - supply
            if len(group) > 1 and gap > worst_above + 1e-9 * max(1.0, together):
                lines.append(_short(model, group, r, together, pools, supply))
                worst_above = gap
    return lines or _conflict(model)


def _no_site(model: _Model, c: DataClass) -> str:
    topo = model.topology
    allowed = [n for n, s in topo.sites.items() if s.may_hold(c)]
    outside = [n for n in allowed if n not in model.scope_sites]
    if outside:
        return (f"{c} data may only live at {_names(outside)}, which this {model.scope} plan "
                f"leaves out; none of its sites ({_names(model.scope_sites)}) may hold {c} data")
    top = max(s.max_data_class for s in topo.sites.values())
    at = [n for n, s in topo.sites.items() if s.max_data_class == top]
    return (f"no site may hold {c} data (the highest max_data_class in this cluster is {top}, "
            f"at {_names(at)}); raise a site's max_data_class to {c} if it is allowed to hold "
            f"such data, or remove the {c} demand")


def _short(model: _Model, group: list[DataClass], r: str, need: float, pools: list[_Pool],
           supply: float) -> str:
    lowest = min(group)
    sites = list(dict.fromkeys(p.site for p in pools))
    offering = [p for p in pools if p.per_node(r) > 0]
    hours = model.demand.hours
    who = _names([g.value for g in sorted(group, reverse=True)], conj="and")
    needs = "needs" if len(group) == 1 else "together need"
    where = f"the sites that may hold {lowest} data ({_names(sites)})"
    if not offering:
        return (f"{who} {needs} {_num(need)} {_HOURS[r]}, but {where} have no "
                f"{_UPPER[r]} pools; add a pool with {_UNITS[r]} at {_names(sites)} or lower "
                f"the demand")
    detail = ", ".join(f"{p.site}/{p.name}: {_count(p.node_hours / hours, 'node')} × "
                       f"{_num(p.per_node(r))} {_UNITS[r]}" for p in offering[:3])
    if len(offering) > 3:
        detail += f", and {len(offering) - 3} more pools"
    shared = "" if len(group) == 1 else " and each class must share them"
    capacity_sites = list(dict.fromkeys(p.site for p in offering))
    return (f"{who} {needs} {_num(need)} {_HOURS[r]}, but {where} offer only "
            f"{_num(supply)} {_HOURS[r]} over {_num(hours)} h ({detail}){shared}; short by "
            f"{_num(need - supply)} {_HOURS[r]}. Add {_UPPER[r]} capacity at "
            f"{_names(capacity_sites, conj='or')}, plan over more hours, or lower the demand")


def _conflict(model: _Model) -> list[str]:
    """Every class fits alone and every resource in total: CPU and GPU demand compete.

    A deletion filter over the demand rows finds a minimal conflicting set; the elastic
    program then says how short it falls and which pools it fills.
    """
    keep = list(range(len(model.rows)))
    for k in list(keep):
        trial = [i for i in keep if i != k]
        short, _ = model.shortfall(trial) if trial else (np.zeros(0), None)
        if _is_short(model, trial, short):
            keep = trial
    keep.sort(key=lambda k: -model.rows[k][0].rank)  # most restricted first
    short, used = model.shortfall(keep)
    classes = {model.rows[k][0] for k in keep}
    full = [p for i, p in enumerate(model.pools)
            if any(c <= p.max_class for c in classes) and used[i] >= p.node_hours * (1 - 1e-6)]
    what = _names([f"{c} {_HOURS[r]} ({_num(d)})" for c, r, d in
                   (model.rows[k] for k in keep)], conj="and")
    pools = ", ".join(f"{p.site}/{p.name} ({_num(p.node_hours)} node-hours)" for p in full[:4])
    if len(full) > 4:
        pools += f" and {len(full) - 4} more pools"
    gaps = _names([f"{_num(s)} {_HOURS[model.rows[k][1]]} of {model.rows[k][0]}"
                   for k, s in zip(keep, short, strict=True) if s > 1e-6], conj="and")
    sites = list(dict.fromkeys(p.site for p in full))
    return [f"{what} each fit alone but not together: they compete for the same node-hours "
            f"at {pools or 'the same pools'}, and a node-hour serves one class at a time; the "
            f"closest plan is short by {gaps or 'a little'}. Add capacity at "
            f"{_names(sites, conj='or') or 'these sites'}, plan over more hours, or lower the "
            f"demand"]


def _is_short(model: _Model, keep: list[int], short: np.ndarray) -> bool:
    return any(s > 1e-7 * max(1.0, model.rows[k][2]) for k, s in zip(keep, short, strict=True))


def _names(items: Iterable[str], conj: str = "", limit: int = 4) -> str:
    items = list(items)
    if len(items) > limit:
        items = items[:limit] + [f"{len(items) - limit} more"]
    if conj and len(items) > 1:
        return ", ".join(items[:-1]) + f" {conj} " + items[-1]
    return ", ".join(items)


def _count(x: float, noun: str) -> str:
    return f"{_num(x)} {noun}" + ("" if math.isclose(x, 1) else "s")


def _num(x: float) -> str:
    if math.isclose(x, round(x), abs_tol=1e-6):
        return f"{round(x):,}"
    return f"{x:,.1f}"
