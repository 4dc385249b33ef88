"""The placement decision: plain data that policies return and the compiler turns into options.

A ``Placement`` is either an ordered list of candidate sites, each with the reason it is there,
or a refusal that names the rule that refused and the fix. Tests can build one by hand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

from hybridray.exceptions import PlacementRefused
from hybridray.placement.workload import Workload


class Candidate(NamedTuple):
    """One site the workload may run at, in preference order.

    A tuple (not a dataclass) because a decision over a large topology builds dozens of
    these; the human-readable ``reason`` is formatted only when someone reads it.
    """

    site: str
    pool: str
    why: str                 # the preference's word for this position, e.g. "burst to cloud"
    max_data_class: str      # the site's limit, for the reason text
    price_unit_hour: float   # price of one unit for one hour in the chosen pool
    est_cost: float          # estimated cost of the whole workload here (compute + egress)
    units_max: int           # units that fit at this site at full size
    units_free: int | None   # units that fit now (None: no live capacity known)
    # The site's pools that fit one unit, when that is fewer than all its pools: compiled
    # into a ``hybridray.io/pool`` selector so Ray cannot start the work on another pool.
    pools: tuple[str, ...] = ()
    units_addable: int = 0   # units on nodes Ray's autoscaler may still add (elastic pools)

    @property
    def reason(self) -> str:
        free = "" if self.units_free is None else f", {self.units_free} units free"
        if self.units_addable:
            free += f", {self.units_addable} more on nodes Ray may add"
        return (f"{self.why}: may hold up to {self.max_data_class}; pool {self.pool} "
                f"${self.price_unit_hour:.3f}/unit-h, est ${self.est_cost:.2f}{free}")


@dataclass(frozen=True)
class Refusal:
    rule: str                # residency | unknown-site | shape | capacity
    message: str
    fix: str


@dataclass(frozen=True)
class Placement:
    """Where a workload may run (ordered ``candidates``) or why it may not (``refusal``)."""

    workload: Workload
    candidates: tuple[Candidate, ...] = ()
    refusal: Refusal | None = None
    excluded: dict[str, str] = field(default_factory=dict)   # site -> why it is not a candidate
    policy: str = ""
    decided_at: float = field(default_factory=time.time)
    # live nodes it must stay off (drift, from the capacity it was decided with): every
    # compiled selector excludes them by Ray's ray.io/node-id label
    avoid_nodes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.refusal is None and bool(self.candidates)

    @property
    def sites(self) -> list[str]:
        return [c.site for c in self.candidates]

    @property
    def primary(self) -> Candidate:
        self.raise_if_refused()
        return self.candidates[0]

    def raise_if_refused(self) -> Placement:
        """Return self, or raise ``PlacementRefused`` carrying the rule and the fix."""
        if self.refusal is not None:
            raise PlacementRefused(f"{self.workload.name}: {self.refusal.message}",
                                   rule=self.refusal.rule, fix=self.refusal.fix)
        return self

    def assign(self, count: int | None = None) -> list[str]:
        """Spread ``count`` units (default: the workload's) over candidates in order.

        Fills each site's free units (or full-size units when nothing live is known) before
        moving to the next; then the units of nodes Ray's autoscaler may still add to elastic
        pools, in the same order; units beyond all capacity go to the primary, where Ray
        queues them.
        """
        self.raise_if_refused()
        count = self.workload.count if count is None else count
        out: list[str] = []
        for pass_ in ("free", "addable"):
            for c in self.candidates:
                if pass_ == "free":
                    room = c.units_free if c.units_free is not None else c.units_max
                else:
                    room = c.units_addable if c.units_free is not None else 0
                take = min(room, count - len(out))
                out.extend([c.site] * max(take, 0))
                if len(out) >= count:
                    return out
        out.extend([self.candidates[0].site] * (count - len(out)))
        return out

    def summary(self) -> dict:
        """A JSON-able record for the audit log and ``--json`` output."""
        wl = self.workload
        record = {
            "workload": wl.name,
            "kind": wl.kind.value,
            "data_class": wl.data_class.value,
            "preference": wl.preference.value,
            "count": wl.count,
            "cpus": wl.cpus,
            "gpus": wl.gpus,
            "policy": self.policy,
            "outcome": "placed" if self.ok else "refused",
        }
        if wl.class_defaulted:
            record["data_class_source"] = "cluster default (no data_classes declared)"
        if self.ok:
            record["sites"] = self.sites
            record["reasons"] = {c.site: c.reason for c in self.candidates}
        else:
            assert self.refusal is not None
            record["rule"] = self.refusal.rule
            record["message"] = self.refusal.message
            record["fix"] = self.refusal.fix
        if self.excluded:
            record["excluded"] = dict(self.excluded)
        if self.avoid_nodes:
            record["avoid_nodes"] = list(self.avoid_nodes)
        return record
