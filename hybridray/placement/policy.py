"""Placement policy: a pure function from (topology, workload, capacity) to a ``Placement``.

Rules, applied in order, each of which can refuse:

1. **Residency** (deny by default): only sites whose ``max_data_class`` is at or above the
   highest class the workload touches are candidates.
2. **Named site**: ``site=`` must exist and pass residency.
3. **Shape**: a site needs a pool whose single node fits one unit (CPUs, GPUs, accelerator,
   spot allowed or not).
4. **Capacity**: the allowed sites together must be able to hold ``count`` units at full size,
   and, when live capacity is known, at least one allowed node must be alive, and the work
   must be able to start some day beside what actors and placement groups hold there (a
   Serve replica holds its CPUs until the service is deleted), unless it asks to ``queue``.

The survivors are ordered by the workload's preference and returned with a reason each. The
compiler (``hybridray.placement.compile``) turns the order into Ray's ``label_selector`` plus
``fallback_strategy``, so Ray itself bursts to the next site when the first is full.
"""

from __future__ import annotations

from hybridray.placement.capacity import Capacity
from hybridray.placement.decision import Candidate, Placement, Refusal
from hybridray.placement.workload import Preference, Workload, WorkloadKind
from hybridray.topology.models import SiteKind, Topology

POLICY_NAME = "residency>site>shape>capacity>preference"


def decide(topology: Topology, workload: Workload, capacity: Capacity | None = None) -> Placement:
    """Decide where ``workload`` may run; never raises for a refusal (see ``Placement``)."""
    wl = resolve_class(topology, workload)
    cls = wl.data_class
    cap = capacity or _topology_capacity(topology)

    def refuse(rule: str, message: str, fix: str, excluded: dict[str, str]) -> Placement:
        return Placement(wl, refusal=Refusal(rule, message, fix), excluded=excluded,
                         policy=POLICY_NAME, avoid_nodes=tuple(sorted(cap.avoid)))

    for name in (wl.site, wl.data_site):
        if name is not None and name not in topology.sites:
            return refuse("unknown-site", f"site {name!r} is not in cluster {topology.name!r}",
                          f"use one of: {', '.join(topology.sites)}", {})

    allowed = topology.sites_by_class[cls]
    rows, excluded, total = _eligible(topology, cap, wl)
    excluded = dict(excluded)
    if not allowed:
        return refuse("residency", f"no site may hold {cls.value} data",
                      f"raise max_data_class of a suitable site to {cls.value}, or mask the "
                      "data down to a lower class before this work runs", excluded)
    if wl.site is not None and wl.site not in allowed:
        return refuse("residency",
                      f"site {wl.site!r} may hold up to "
                      f"{topology.sites[wl.site].max_data_class.value}, not {cls.value}",
                      f"run it at {', '.join(allowed)} (allowed for {cls.value}), or lower the "
                      "data's class by masking", excluded)
    if not rows:
        rule = "capacity" if any("alive" in r or "capacity" in r for r in excluded.values()) \
            else "shape"
        return refuse(rule, f"no site allowed for {cls.value} can run one unit "
                            f"({_shape(wl)}): " + "; ".join(f"{k}: {v}" for k, v in
                                                            excluded.items()),
                      "start or add nodes with that shape at "
                      f"{', '.join(allowed)}, or ask for fewer resources per unit", excluded)
    if total < wl.count:
        return refuse("capacity",
                      f"{wl.count} units of {_shape(wl)} need more than the {total} that sites "
                      f"allowed for {cls.value} ({', '.join(r[0] for r in rows)}) can hold",
                      "lower count, or add capacity at a site that may hold "
                      f"{cls.value} data", excluded)

    scale = wl.count * wl.expected_hours
    egress = _egress_per_site(topology, wl)
    costs = [r[2] * scale + egress.get(r[0], 0.0) for r in rows]
    order = _order(topology, wl, rows, costs)
    if not wl.burst:
        for i in order[1:]:
            excluded[rows[i][0]] = "burst disabled"
        order = order[:1]
    if cap.live and not wl.queue:
        never = _never_fits(wl, cap, [rows[i] for i in order])
        if never is not None:
            return refuse("capacity", *never, excluded)
    words = _WORDS[wl.preference]
    live = cap.live
    candidates = tuple(
        Candidate(rows[i][0], rows[i][1], words(wl, rows[i], pos), rows[i][5], rows[i][2],
                  costs[i], rows[i][3], rows[i][4] if live else None, rows[i][7],
                  rows[i][8] if live else 0)
        for pos, i in enumerate(order))
    return Placement(wl, candidates=candidates, excluded=excluded, policy=POLICY_NAME,
                     avoid_nodes=tuple(sorted(cap.avoid)))


def resolve_class(topology: Topology, workload: Workload) -> Workload:
    """``workload`` itself when it declares its data, else a copy that takes the cluster's
    ``default_data_class`` (restricted unless the topology says otherwise): the same rule
    sync and training apply to undeclared data, so no path treats "undeclared" as public."""
    if workload.data_classes:
        return workload
    return workload.model_copy(update={"data_classes": (topology.default_data_class,),
                                       "class_defaulted": True})


def _eligible(topology: Topology, cap: Capacity, wl: Workload):
    """Sites that pass residency, shape and capacity for this shape, memoised per capacity.

    Returns (rows, excluded, total units): rows are (site, pool, price per unit-hour, units
    at full size, units free now, the site's max data class, whether the site is a cloud, the
    fitting pools when fewer than all the site's pools fit, units on nodes Ray's autoscaler
    may still add), in topology order; excluded maps site -> why it is not a candidate.
    """
    key = ("eligible", wl.data_class, wl.cpus, wl.gpus, wl.accelerator, wl.spot_ok)
    hit = cap.memo.get(key)
    if hit is not None:
        return hit
    allowed = topology.sites_by_class[wl.data_class]
    excluded: dict[str, str] = {}
    for name, site in topology.sites.items():
        if name not in allowed:
            excluded[name] = (f"may hold up to {site.max_data_class.value}, "
                              f"not {wl.data_class.value}")
    rows = []
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
            if cap.avoided.get(name):      # say why a node that may have fitted was left out
                excluded[name] += (f" (kept off {len(cap.avoided[name])} node(s) that drifted "
                                   f"from the topology: {'; '.join(cap.avoided[name])})")
            continue
        price = pool.price_per_node_hour * _share(wl, pool.cpus, pool.gpus)
        usable = [p for p in site.pools if p.max_nodes > 0]
        narrower = tuple(p.name for p in pools) if len(pools) < len(usable) else ()
        addable = cap.units_addable(name, wl.cpus, wl.gpus, wl.accelerator, wl.spot_ok) \
            if cap.live else 0
        rows.append((name, pool.name, price, units_max, units_free,
                     site.max_data_class.value, site.kind is SiteKind.cloud, narrower,
                     addable))
    result = (rows, excluded, sum(r[3] for r in rows))
    cap.memo[key] = result
    return result


def _never_fits(wl: Workload, cap: Capacity, rows: list) -> tuple[str, str] | None:
    """(message, fix) when live work can never start beside what actors and placement groups
    hold at its sites; None when it fits now, could fit later, or that cannot be known.

    Tasks and Data stages queue one unit at a time; worker groups, replicas, actors and job
    entrypoints need all ``count`` units at once.
    """
    need = 1 if wl.kind in (WorkloadKind.task, WorkloadKind.data) else wl.count
    if sum(r[4] or 0 for r in rows) >= need:
        return None
    lasting = [cap.lasting_units(r[0], wl.cpus, wl.gpus, wl.accelerator, wl.spot_ok)
               for r in rows]
    # nodes Ray's autoscaler may still add to an elastic pool hold nothing yet: room to come
    if any(x is None for x in lasting) or sum(lasting) + sum(r[8] for r in rows) >= need:
        return None
    sites = [r[0] for r in rows]
    usage = cap.usage
    what = f"{need} units of {_shape(wl)}" if need > 1 else f"one unit of {_shape(wl)}"
    message = (f"{what} can never start at {', '.join(sites)} while what holds them there "
               f"stays (room beside it: {sum(lasting)}): "
               + " | ".join(usage.describe_site(s) for s in sites))
    fix = (usage.fix(sites) + "; or queue behind it (Workload(queue=True); hybridray train "
           "--queue), which waits, reporting, up to $HYBRIDRAY_WAIT_TIMEOUT_S seconds")
    return message, fix


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


def _egress_per_site(topology: Topology, wl: Workload) -> dict[str, float]:
    """Cost of moving the workload's input from its data site to each other site.

    Uses ``Topology.link`` (a link declared in one direction prices both), memoised per data
    site on the topology since it is frozen.
    """
    if wl.data_site is None or not wl.data_bytes:
        return {}
    memo = topology.__dict__.setdefault("_hr_egress_per_gb", {})
    per_gb = memo.get(wl.data_site)
    if per_gb is None:
        per_gb = {}
        for dst in topology.sites:
            link = topology.link(wl.data_site, dst)
            if link is not None:
                per_gb[dst] = link.egress_per_gb
        memo[wl.data_site] = per_gb
    gb = wl.data_bytes / 1e9
    return {dst: price * gb for dst, price in per_gb.items()}


def _bandwidth(topology: Topology, wl: Workload, site: str) -> float:
    if wl.data_site is None or wl.data_site == site:
        return float("inf")
    link = topology.link(wl.data_site, site)
    return link.bandwidth_mbps if link else 0.0


def _order(topology: Topology, wl: Workload, rows: list, costs: list[float]) -> list[int]:
    """Indices of ``rows`` in the workload's preference order (ties broken by site name)."""
    idx = range(len(rows))
    pref = wl.preference
    if pref is Preference.cheapest:
        return sorted(idx, key=lambda i: (costs[i], rows[i][0]))
    if pref is Preference.onprem_first:
        return sorted(idx, key=lambda i: (rows[i][6], costs[i], rows[i][0]))
    if pref is Preference.near_data:
        return sorted(idx, key=lambda i: (rows[i][0] != wl.data_site,
                                          -_bandwidth(topology, wl, rows[i][0]), costs[i],
                                          rows[i][0]))
    if pref is Preference.fastest:
        live = [r[4] if r[4] is not None else r[3] for r in rows]
        return sorted(idx, key=lambda i: (-live[i], -_bandwidth(topology, wl, rows[i][0]),
                                          costs[i], rows[i][0]))
    return sorted(idx, key=lambda i: (rows[i][0] != wl.site, costs[i], rows[i][0]))


_WORDS = {  # (workload, row, position) -> the reason's first words
    Preference.cheapest: lambda wl, r, pos: "cheapest" if pos == 0 else "next cheapest",
    Preference.onprem_first: lambda wl, r, pos: "burst to cloud" if r[6] else "on-prem first",
    Preference.near_data: lambda wl, r, pos: "holds the data" if r[0] == wl.data_site
    else "near the data",
    Preference.fastest: lambda wl, r, pos: "most free capacity" if pos == 0
    else "next most free",
    Preference.site: lambda wl, r, pos: "requested site" if r[0] == wl.site else "burst",
}


def _shape(wl: Workload) -> str:
    parts = [f"{wl.cpus:g} CPU"]
    if wl.gpus:
        parts.append(f"{wl.gpus:g} GPU" + (f" {wl.accelerator}" if wl.accelerator else ""))
    if not wl.spot_ok:
        parts.append("no spot")
    return ", ".join(parts)
