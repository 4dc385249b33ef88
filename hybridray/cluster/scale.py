"""Pre-provision elastic pools through Ray's autoscaler: ``request_resources`` with selectors.

Waiting for the first task to make Ray add a node costs a node's start-up time at the moment
the work arrives. When the work is known ahead (a plan, a training next hour), the nodes can be
asked for first: a resource request of bundles with label selectors tells Ray's autoscaler to
keep room for them, and a bundle's label selector (``hybridray.io/site`` and
``hybridray.io/pool``) is what makes it add the node at the right site. The request goes
through Ray's ``AutoscalingCoordinator`` (see ``REQUESTER`` below for why) and stays until it
is replaced or cleared (``hybridray scale NAME --clear``); after that the nodes stop when
idle, like any other. Every request is audited.

Ray decides; this module only turns "N nodes of SITE.POOL" (given, or from a cost plan) into
bundles, and refuses what Ray could never satisfy: a static pool, more than ``max``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hybridray import labels as L
from hybridray.audit import AuditLog
from hybridray.cluster.elastic import node_type_name
from hybridray.exceptions import ConfigError
from hybridray.placement.compile import NODE_ID
from hybridray.topology.models import Topology


@dataclass(frozen=True)
class PoolRequest:
    """Keep room for ``nodes`` whole nodes of one elastic pool."""

    site: str
    pool: str
    nodes: int
    note: str = ""

    @property
    def node_type(self) -> str:
        return node_type_name(self.site, self.pool)


def _elastic_names(topology: Topology) -> list[str]:
    return [node_type_name(s, p.name) for s, site in topology.sites.items()
            for p in site.pools if p.elastic]


def parse_nodes(topology: Topology, specs: list[str]) -> list[PoolRequest]:
    """``SITE.POOL=N`` strings as requests; a ``ConfigError`` naming every bad one."""
    problems, out = [], []
    choices = ", ".join(_elastic_names(topology)) or "none (this cluster has no elastic pool)"
    for spec in specs:
        target, sep, raw = spec.partition("=")
        site, dot, pool = target.partition(".")
        if not sep or not dot:
            problems.append(f"--nodes {spec}: expected SITE.POOL=N, e.g. --nodes "
                            f"{(_elastic_names(topology) or ['cloud-a.cpu'])[0]}=1")
            continue
        try:
            n = int(raw)
        except ValueError:
            n = -1
        if n < 0:
            problems.append(f"--nodes {spec}: N must be a whole number of nodes, 0 or more")
            continue
        problem = check_pool(topology, site, pool, n)
        if problem:
            problems.append(f"--nodes {spec}: {problem} (elastic pools: {choices})")
            continue
        out.append(PoolRequest(site, pool, n))
    if problems:
        raise ConfigError(problems)
    return out


def check_pool(topology: Topology, site: str, pool: str, nodes: int) -> str | None:
    """Why ``nodes`` nodes of ``site.pool`` cannot be requested, or None."""
    if site not in topology.sites:
        return f"no site {site!r} in cluster {topology.name!r}"
    found = next((p for p in topology.sites[site].pools if p.name == pool), None)
    if found is None:
        return f"site {site!r} has no pool {pool!r}"
    if not found.elastic:
        return (f"{site}.{pool} is static (count: {found.count}): its nodes are up from "
                "`up` to `down`; only elastic pools (min/max) can be pre-provisioned")
    if nodes > found.max_nodes:
        return f"{site}.{pool} may have at most {found.max_nodes} nodes (max)"
    return None


def from_plan(topology: Topology, plan: dict[str, Any]) -> list[PoolRequest]:
    """Requests from a cost plan (``hybridray plan --json``, or ``Plan.to_dict()``).

    A pool's node-hours over the plan's horizon is how many nodes it needs on average; that,
    rounded up and capped at the pool's ``max``, is kept ready. Static pools are left out
    (always up), with a note.
    """
    chosen = plan.get("plans", {}).get("optimal", plan)
    if not isinstance(chosen, dict) or chosen.get("status") != "optimal" \
            or "allocations" not in chosen:
        raise ConfigError("the plan has no optimal allocation to provision; give the output "
                          "of `hybridray plan FILE --demand ... --json` for a feasible demand")
    hours = float(chosen.get("hours") or plan.get("hours") or 0)
    if hours <= 0:
        raise ConfigError("the plan has no horizon (hours); give `hybridray plan --json` output")
    node_hours: dict[tuple[str, str], float] = {}
    for a in chosen["allocations"]:
        key = (a["site"], a["pool"])
        node_hours[key] = node_hours.get(key, 0.0) + float(a["node_hours"])
    out = []
    for (site, pool), nh in node_hours.items():
        where = topology.sites.get(site)
        found = next((p for p in where.pools if p.name == pool), None) if where else None
        if found is None:
            raise ConfigError(f"the plan allocates {site}.{pool}, which cluster "
                              f"{topology.name!r} does not have; plan on this cluster's file")
        need = math.ceil(nh / hours - 1e-9)
        if not found.elastic:
            out.append(PoolRequest(site, pool, 0, f"static pool, {found.count} node(s) always "
                                   f"up; the plan uses {nh / hours:.2f} on average"))
            continue
        note = f"{nh:g} node-hours over {hours:g} h"
        if need > found.max_nodes:
            note += f"; capped at max {found.max_nodes} (the plan wants {need})"
            need = found.max_nodes
        out.append(PoolRequest(site, pool, need, note))
    return out


def bundles(topology: Topology, requests: list[PoolRequest], avoid: Iterable[str] = ()
            ) -> tuple[list[dict[str, float]], list[dict[str, str]]]:
    """(bundles, bundle_label_selectors): one whole-node bundle per requested node, each
    selecting its site and pool by label, and keeping off the ``avoid`` node ids (drift: a
    node that joined with the pool's labels but is no member must not count as room)."""
    keep_off = sorted(avoid)
    out_b: list[dict[str, float]] = []
    out_s: list[dict[str, str]] = []
    for r in requests:
        pool = next(p for p in topology.sites[r.site].pools if p.name == r.pool)
        if not pool.elastic:
            continue
        shape: dict[str, float] = {"CPU": float(pool.cpus)}
        if pool.gpus:
            shape["GPU"] = float(pool.gpus)
        selector = {L.SITE: r.site, L.POOL: r.pool}
        if keep_off:
            selector[NODE_ID] = f"!in({','.join(keep_off)})"
        for _ in range(r.nodes):
            out_b.append(dict(shape))
            out_s.append(dict(selector))
    return out_b, out_s


# Ray keeps ONE cluster resource constraint per cluster, and ``request_resources`` replaces
# it. Ray Data and Ray Train share it through Ray's ``AutoscalingCoordinator`` (a detached
# actor, created the first time either asks for resources), which re-sends the merge of its
# requesters' requests every 20 s, an empty one when it has none. A plain
# ``request_resources`` of ours was therefore wiped within 20 s on any cluster that had run a
# Ray Data pipeline or a Train run: before the node launched, or while it idled (seen in test
# runs as a node never launched, and as one stopped 7 s after its launch). So hybridray asks
# through the coordinator too, as one more requester, and its request lasts until replaced
# or cleared (an expiry of years).
REQUESTER = "hybridray-scale:{cluster}"
NEVER_EXPIRES_S = 10 * 365 * 24 * 3600.0
COORDINATOR_TIMEOUT_S = 30.0


def request(topology: Topology, requests: list[PoolRequest], *, audit: AuditLog,
            source: str, avoid: Iterable[str] = ()) -> dict[str, Any]:
    """Ask Ray's autoscaler (this process must be connected to the cluster) for the
    requested nodes, replacing any earlier request; an empty list clears it. Audited.
    ``avoid``: drift node ids no bundle may count on.

    The request goes through Ray's ``AutoscalingCoordinator`` (see ``REQUESTER``), merged
    with what Ray Data and Ray Train ask for, so neither wipes it."""
    import ray

    avoid = sorted(avoid)
    shapes, selectors = bundles(topology, requests, avoid)
    coordinator = _coordinator()
    requester = REQUESTER.format(cluster=topology.name)
    if coordinator is None:       # a Ray without the coordinator: the single constraint
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=shapes, bundle_label_selectors=selectors)
    elif shapes:
        ray.get(coordinator.request_resources.remote(
            requester_id=requester, resources=shapes, expire_after_s=NEVER_EXPIRES_S,
            label_selectors=selectors), timeout=COORDINATOR_TIMEOUT_S)
    else:
        ray.get(coordinator.cancel_request.remote(requester), timeout=COORDINATOR_TIMEOUT_S)
    return audit.record(
        "scale-request", cluster=topology.name, source=source, bundles=len(shapes),
        avoided=avoid, via="coordinator" if coordinator is not None else "request_resources",
        pools=[{"site": r.site, "pool": r.pool, "node_type": r.node_type, "nodes": r.nodes,
                "note": r.note} for r in requests])


def _coordinator():
    """Ray's ``AutoscalingCoordinator`` actor (created if it is not running yet), or None
    when this Ray has none (it is internal to Ray Data; present in Ray 2.60)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return None
    return get_or_create_autoscaling_coordinator()
