"""Placement policy: a pure function from (topology, workload, capacity) to a ``Placement``.

Rules, applied in order, each of which can refuse:

1. **Residency** (deny by default): only sites whose ``max_data_class`` is at or above the
   highest class the workload touches are candidates.
2. **Named site**: ``site=`` must exist and pass residency.
3. **Shape**: a site needs a pool whose single node fits one unit (CPUs, GPUs, accelerator,
   spot allowed or not).
4. **Capacity**: the allowed sites together must be able to hold ``count`` units at full size,
   and, when live capacity is known, at least one allowed node must be alive.

The survivors are ordered by the workload's preference and returned with a reason each. The
compiler (``hybridray.placement.compile``) turns the order into Ray's ``label_selector`` plus
``fallback_strategy``, so Ray itself bursts to the next site when the first is full.
"""

from __future__ import annotations

from hybridray.placement.capacity import Capacity
from hybridray.placement.decision import Candidate, Placement, Refusal
from hybridray.placement.workload import Preference, Workload
from hybridray.topology.models import SiteKind, Topology

POLICY_NAME = "residency>site>shape>capacity>preference"


def decide(topology: Topology, workload: Workload, capacity: Capacity | None = None) -> Placement:
    """Decide where ``workload`` may run; never raises for a refusal (see ``Placement``)."""
    wl = workload
    cls = wl.data_class
    cap = capacity or _topology_capacity(topology)
    excluded: dict[str, str] = {}

    def refuse(rule: str, message: str, fix: str) -> Placement:
        return Placement(wl, refusal=Refusal(rule, message, fix), excluded=excluded,
                         policy=POLICY_NAME)

    for name in (wl.site, wl.data_site):
        if name is not None and name not in topology.sites:
            return refuse("unknown-site", f"site {name!r} is not in cluster {topology.name!r}",
                          f"use one of: {', '.join(topology.sites)}")

    allowed = topology.sites_by_class[cls]
    for name, site in topology.sites.items():
        if name not in allowed:
            excluded[name] = f"may hold up to {site.max_data_class.value}, not {cls.value}"
    if not allowed:
        return refuse("residency", f"no site may hold {cls.value} data",
                      f"raise max_data_class of a suitable site to {cls.value}, or mask the "
                      "data down to a lower class before this work runs")
    if wl.site is not None and wl.site not in allowed:
        return refuse("residency",
                      f"site {wl.site!r} may hold up to "
                      f"{topology.sites[wl.site].max_data_class.value}, not {cls.value}",
                      f"run it at {', '.join(allowed)} (allowed for {cls.value}), or lower the "
                      "data's class by masking")

    rows = []  # (site, pool, price per unit-hour, units_max, units_free)
    for name in allowed:
        site = topology.sites[name]
        pools = [p for p in site.pools if p.max_nodes > 0 and p.cpus >= wl.cpus
                 and p.gpus >= wl.gpus and (wl.accelerator is None or p.accelerator ==
                                            wl.accelerator) and (wl.spot_ok or not p.spot)]
        if not pools:
            excluded[name] = f"no pool fits one unit ({_shape(wl)})"
            continue
        pool = min(pools, key=lambda p: p.price_per_node_hour * _share(wl, p.cpus, p.gpus))
        units_max, units_free = cap.units(name, wl.cpus, wl.gpus, wl.accelerator, wl.spot_ok)
        if units_max <= 0:
            excluded[name] = "no alive node fits one unit" if cap.live else "no capacity"
            continue
        price = pool.price_per_node_hour * _share(wl, pool.cpus, pool.gpus)
        rows.append((name, pool.name, price, units_max, units_free if cap.live else None))

    if not rows:
        rule = "capacity" if any("alive" in r or "capacity" in r for r in excluded.values()) \
            else "shape"
        return refuse(rule, f"no site allowed for {cls.value} can run one unit "
                            f"({_shape(wl)}): " + "; ".join(f"{k}: {v}" for k, v in
                                                            excluded.items()),
                      "start or add nodes with that shape at "
                      f"{', '.join(allowed)}, or ask for fewer resources per unit")
    total = sum(r[3] for r in rows)
    if total < wl.count:
        return refuse("capacity",
                      f"{wl.count} units of {_shape(wl)} need more than the {total} that sites "
                      f"allowed for {cls.value} ({', '.join(r[0] for r in rows)}) can hold",
                      "lower count, or add capacity at a site that may hold "
                      f"{cls.value} data")

    ordered = _order(topology, wl, rows)
    if not wl.burst:
        for row in ordered[1:]:
            excluded[row[0]] = "burst disabled"
        ordered = ordered[:1]
    candidates = tuple(
        Candidate(site=r[0], pool=r[1], reason=_reason(topology, wl, r, i),
                  est_cost=_cost(topology, wl, r), units_max=r[3], units_free=r[4])
        for i, r in enumerate(ordered))
    return Placement(wl, candidates=candidates, excluded=excluded, policy=POLICY_NAME)


def _topology_capacity(topology: Topology) -> Capacity:
    # Topologies are frozen, so their full-size capacity can be built once and memoised.
    cap = topology.__dict__.get("_hr_capacity")
    if cap is None:
        cap = Capacity.from_topology(topology)
        topology.__dict__["_hr_capacity"] = cap
    return cap


def _share(wl: Workload, cpus: float, gpus: float) -> float:
    """Fraction of a node one unit uses (what its price is charged on)."""
    parts = [wl.cpus / cpus if cpus else 0.0]
    if wl.gpus:
        parts.append(wl.gpus / gpus)
    return max(max(parts), 1e-6)


def _egress(topology: Topology, wl: Workload, site: str) -> float:
    if wl.data_site is None or wl.data_site == site or not wl.data_bytes:
        return 0.0
    return topology.egress_cost(wl.data_site, site, wl.data_bytes)


def _cost(topology: Topology, wl: Workload, row) -> float:
    return row[2] * wl.count * wl.expected_hours + _egress(topology, wl, row[0])


def _bandwidth(topology: Topology, wl: Workload, site: str) -> float:
    if wl.data_site is None or wl.data_site == site:
        return float("inf")
    link = topology.link(wl.data_site, site)
    return link.bandwidth_mbps if link else 0.0


def _order(topology: Topology, wl: Workload, rows: list) -> list:
    cost = {r[0]: _cost(topology, wl, r) for r in rows}
    pref = wl.preference
    if pref is Preference.cheapest:
        key = lambda r: (cost[r[0]], r[0])  # noqa: E731
    elif pref is Preference.onprem_first:
        key = lambda r: (topology.sites[r[0]].kind is SiteKind.cloud, cost[r[0]], r[0])  # noqa: E731
    elif pref is Preference.near_data:
        key = lambda r: (r[0] != wl.data_site, -_bandwidth(topology, wl, r[0]),  # noqa: E731
                         cost[r[0]], r[0])
    elif pref is Preference.fastest:
        key = lambda r: (-(r[4] if r[4] is not None else r[3]),  # noqa: E731
                         -_bandwidth(topology, wl, r[0]), cost[r[0]], r[0])
    else:  # Preference.site
        key = lambda r: (r[0] != wl.site, cost[r[0]], r[0])  # noqa: E731
    return sorted(rows, key=key)


def _reason(topology: Topology, wl: Workload, row, index: int) -> str:
    site = topology.sites[row[0]]
    why = {
        Preference.cheapest: "cheapest" if index == 0 else "next cheapest",
        Preference.onprem_first: ("on-prem first" if site.kind is not SiteKind.cloud
                                  else "burst to cloud"),
        Preference.near_data: "holds the data" if row[0] == wl.data_site else "near the data",
        Preference.fastest: "most free capacity" if index == 0 else "next most free",
        Preference.site: "requested site" if row[0] == wl.site else "burst",
    }[wl.preference]
    free = "" if row[4] is None else f", {row[4]} free"
    return (f"{why}: may hold {site.max_data_class.value} >= {wl.data_class.value}; "
            f"pool {row[1]} ${row[2]:.3f}/unit-h, est ${_cost(topology, wl, row):.2f}"
            f"{free}")


def _shape(wl: Workload) -> str:
    parts = [f"{wl.cpus:g} CPU"]
    if wl.gpus:
        parts.append(f"{wl.gpus:g} GPU" + (f" {wl.accelerator}" if wl.accelerator else ""))
    if not wl.spot_ok:
        parts.append("no spot")
    return ", ".join(parts)
