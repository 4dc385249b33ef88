"""How many units of a workload fit at each site: at full size (topology) or now (live Ray).

``avoid`` carries the live nodes placement must stay off (drift: node id -> why, from
``hybridray.cluster.membership``): they add no capacity, and ``decide`` hands them to the
placement so the compiler excludes them from every selector.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from hybridray import labels as L
from hybridray.topology.models import Topology

_UNLIMITED = 1_000_000  # units of a zero-resource workload (Ray does not limit those)


@dataclass(frozen=True)
class NodeCapacity:
    """One node (or ``n`` identical nodes) at a site."""

    site: str
    pool: str
    cpus_total: float
    cpus_free: float
    gpus_total: float
    gpus_free: float
    accelerator: str | None = None
    spot: bool = False
    n: int = 1
    addable: bool = False   # not running: nodes Ray's autoscaler may still add (elastic pool)


class Capacity:
    """Per-site node capacity, with ``units`` memoised per workload shape.

    Live capacity also knows, on demand, what *lasts* at each site: CPUs and GPUs held by
    actors and placement groups (Serve replicas, training workers) stay held until someone
    releases them, while running tasks end on their own. ``lasting_units`` counts what could
    ever fit beside what lasts; it reads Ray's state API once, only when the free units are
    short (``hybridray.waiting.node_usage``).
    """

    def __init__(self, nodes: list[NodeCapacity], *, live: bool,
                 avoid: dict[str, str] | None = None, usage_loader=None,
                 avoided: Iterable[tuple[str, str]] = ()):
        self.live = live
        self.avoid = dict(avoid or {})
        # site -> why each of its live nodes in ``avoid`` was kept out (for refusals)
        self.avoided: dict[str, list[str]] = defaultdict(list)
        for site, why in avoided:
            self.avoided[site].append(why)
        self.by_site: dict[str, list[NodeCapacity]] = defaultdict(list)
        for node in nodes:
            self.by_site[node.site].append(node)
        self._memo: dict[tuple, tuple[int, int]] = {}
        self.memo: dict[tuple, object] = {}  # the policy's per-shape results
        self._usage_loader = usage_loader
        self._usage = None

    @classmethod
    def from_topology(cls, topology: Topology, *, avoid: dict[str, str] | None = None
                      ) -> Capacity:
        """Every pool at its maximum size, all free (what the topology could offer)."""
        nodes = [
            NodeCapacity(name, p.name, p.cpus, p.cpus, p.gpus, p.gpus, p.accelerator, p.spot,
                         p.max_nodes)
            for name, site in topology.sites.items() for p in site.pools if p.max_nodes > 0
        ]
        return cls(nodes, live=False, avoid=avoid)

    @classmethod
    def from_ray(cls, topology: Topology | None = None, *,
                 avoid: dict[str, str] | None = None,
                 nodes: list[dict] | None = None,
                 free: dict[str, dict[str, float]] | None = None) -> Capacity:
        """What the connected Ray cluster has now: alive nodes, their free CPUs and GPUs
        (``nodes``/``free``: ``ray.nodes()`` and the free resources per node id, already
        read, e.g. by ``hybridray.placement.snapshot``), less the ``avoid`` nodes.

        With ``topology``, an elastic pool (``min``/``max``) also counts the nodes Ray's
        autoscaler may still add (``max`` less those alive) toward its site's full size,
        none of them free yet: a cloud pool scaled to zero stays a place work can burst to.
        """
        import ray
        from ray._private import state as ray_state

        if free is None:
            free = ray_state.available_resources_per_node()
        avoid = avoid or {}
        out, avoided = [], []
        for n in ray.nodes() if nodes is None else nodes:
            labels = n.get("Labels") or {}
            site = labels.get(L.SITE)
            if not n.get("Alive") or site is None or labels.get(L.ROLE) == "head":
                continue
            if n["NodeID"] in avoid:
                avoided.append((site, avoid[n["NodeID"]]))
                continue
            total = n.get("Resources") or {}
            avail = free.get(n["NodeID"], {})
            out.append(NodeCapacity(
                site, labels.get(L.POOL, ""), total.get("CPU", 0.0), avail.get("CPU", 0.0),
                total.get("GPU", 0.0), avail.get("GPU", 0.0), labels.get(L.ACCELERATOR),
                labels.get(L.MARKET_TYPE) == "spot"))
        if topology is not None:
            out += elastic_headroom(topology, out)
        return cls(out, live=True, avoid=avoid, usage_loader=_load_usage, avoided=avoided)

    @property
    def usage_read(self) -> bool:
        """Whether a decision consulted what lasts (``usage``) on this capacity."""
        return self._usage is not None

    @property
    def usage(self):
        """``hybridray.waiting.Usage`` of the live cluster (None: not live, or unreadable)."""
        if self._usage is None and self._usage_loader is not None:
            try:
                self._usage = self._usage_loader()
            except Exception:   # no state: the policy falls back to waiting and reporting
                self._usage_loader = None
        return self._usage

    def lasting_units(self, site: str, cpus: float, gpus: float, accelerator: str | None,
                      spot_ok: bool) -> int | None:
        """Units that could ever fit at ``site`` while its actors and placement groups stay;
        None when that cannot be known (not live, or Ray's state API is unreachable)."""
        usage = self.usage
        if usage is None or usage.state_api is not None:
            return None
        units = 0
        for node in usage.site(site):
            if node.head or node.node_id in self.avoid \
                    or (accelerator and node.accelerator != accelerator) \
                    or (node.spot and not spot_ok):
                continue
            units += _fit(max(0.0, node.cpus - node.lasting_cpus),
                          max(0.0, node.gpus - node.lasting_gpus), cpus, gpus)
        return units

    def units_addable(self, site: str, cpus: float, gpus: float, accelerator: str | None,
                      spot_ok: bool) -> int:
        """Units of one shape the nodes Ray's autoscaler may still add at ``site`` would hold."""
        key = ("addable", site, cpus, gpus, accelerator, spot_ok)
        hit = self._memo.get(key)
        if hit is not None:
            return hit[0]
        units = sum(node.n * _fit(node.cpus_total, node.gpus_total, cpus, gpus)
                    for node in self.by_site.get(site, ()) if node.addable
                    and not (accelerator and node.accelerator != accelerator)
                    and not (node.spot and not spot_ok))
        self._memo[key] = (units, units)
        return units

    def sites(self) -> list[str]:
        return list(self.by_site)

    def units(self, site: str, cpus: float, gpus: float, accelerator: str | None,
              spot_ok: bool) -> tuple[int, int]:
        """(units at full size, units free now) of one ``cpus``/``gpus`` unit at ``site``."""
        key = (site, cpus, gpus, accelerator, spot_ok)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        total = free = 0
        for node in self.by_site.get(site, ()):
            if (accelerator and node.accelerator != accelerator) or (node.spot and not spot_ok):
                continue
            total += node.n * _fit(node.cpus_total, node.gpus_total, cpus, gpus)
            free += node.n * _fit(node.cpus_free, node.gpus_free, cpus, gpus)
        self._memo[key] = (total, free)
        return total, free


def _load_usage():
    from hybridray.waiting import node_usage

    return node_usage()


def _fit(have_cpus: float, have_gpus: float, cpus: float, gpus: float) -> int:
    limits = []
    if cpus > 0:
        limits.append(math.floor(have_cpus / cpus + 1e-9))
    if gpus > 0:
        limits.append(math.floor(have_gpus / gpus + 1e-9))
    return min(limits) if limits else _UNLIMITED


def elastic_headroom(topology: Topology, alive: list[NodeCapacity]) -> list[NodeCapacity]:
    """The nodes each elastic pool may still add: full size, nothing free until launched."""
    out = []
    for name, site in topology.sites.items():
        for p in site.pools:
            if not p.elastic:
                continue
            up = sum(n.n for n in alive if n.site == name and n.pool == p.name)
            if p.max_nodes > up:
                out.append(NodeCapacity(name, p.name, p.cpus, 0.0, p.gpus, 0.0, p.accelerator,
                                        p.spot, p.max_nodes - up, addable=True))
    return out
