"""Which replica deployment answers a request: a version by weight, then sites nearest first.

Every (model, version, site) is its own Serve deployment, pinned to its site by a label
selector, so where a request goes is decided here, in the ingress, from plain data:

- **version**: weighted at random among versions with weight > 0 (or pinned by the caller);
- **site order**: the caller's site first (``X-Hybridray-Site``, else the ingress's own site),
  then the others by link latency from it (from the topology), then by name;
- **health**: sites with no running replica (from Serve's status, polled) or that failed
  recently (*suspect*) are moved to the back, not removed: status can lag, and a request
  tries every site before it fails.

Ray Serve's own locality routing prefers replicas on the caller's node and, by design, its
availability zone; in Ray 2.60 the open-source build does not read node zones
(``DefaultClusterNodeInfoCache.get_node_az`` returns None), so zone preference does nothing
there and site preference is done here instead. Within one site, Serve's power-of-two router
still picks the replica.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Route:
    """One replica deployment: where a (model, version) is served at one site."""

    model: str
    version: str
    site: str
    app: str | None          # the Serve application (None: the ingress's own application)
    deployment: str


@dataclass
class ModelRoutes:
    name: str
    kind: str                          # embedding | completion
    data_class: str
    weights: dict[str, float]          # version -> weight
    routes: dict[str, list[Route]]     # version -> routes (one per site)

    def pick_version(self, rng: random.Random, pinned: str | None = None) -> str | None:
        """A version by weight, or ``pinned`` if it exists (None if it does not)."""
        if pinned is not None:
            return pinned if pinned in self.routes else None
        live = [(v, w) for v, w in self.weights.items() if w > 0 and self.routes.get(v)]
        if not live:
            return None
        total = sum(w for _, w in live)
        x = rng.random() * total
        for version, weight in live:
            x -= weight
            if x < 0:
                return version
        return live[-1][0]


@dataclass
class RoutingTable:
    """Everything the ingress routes by; rebuilt from its ``user_config`` on every change."""

    models: dict[str, ModelRoutes]
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RoutingTable:
        models = {}
        for name, m in config.get("models", {}).items():
            routes = {v: [Route(name, v, site, spec.get("app"), spec["deployment"])
                          for site, spec in info["sites"].items()]
                      for v, info in m["versions"].items()}
            weights = {v: float(info["weight"]) for v, info in m["versions"].items()}
            models[name] = ModelRoutes(name, m["kind"], m["data_class"], weights, routes)
        return cls(models, config.get("latency_ms", {}), list(config.get("sites", [])))

    def site_order(self, caller: str | None, sites: Iterable[str]) -> list[str]:
        """``sites`` ordered: the caller's first, then by latency from it, then by name."""
        near = self.latency_ms.get(caller or "", {})
        return sorted(sites, key=lambda s: (s != caller, near.get(s, float("inf")), s))


class SiteHealth:
    """What the ingress knows about each replica deployment's health right now."""

    def __init__(self, suspect_s: float = 10.0):
        self.suspect_s = suspect_s
        self.running: dict[tuple[str | None, str], int] = {}   # (app, deployment) -> replicas
        self.suspect_until: dict[tuple[str | None, str], float] = {}

    def update(self, running: dict[tuple[str | None, str], int]) -> None:
        self.running = dict(running)

    def suspect(self, route: Route) -> None:
        self.suspect_until[(route.app, route.deployment)] = time.monotonic() + self.suspect_s

    def clear(self, route: Route) -> None:
        self.suspect_until.pop((route.app, route.deployment), None)

    def rank(self, route: Route) -> int:
        """0: healthy; 1: failed recently; 2: no running replica known."""
        key = (route.app, route.deployment)
        if self.running.get(key, 1) == 0:    # unknown counts as running: status may lag
            return 2
        if self.suspect_until.get(key, 0.0) > time.monotonic():
            return 1
        return 0

    def order(self, table: RoutingTable, routes: list[Route], caller: str | None
              ) -> list[Route]:
        """Routes to try, in order: healthy ones nearest first, then suspect, then empty."""
        by_site = {r.site: r for r in routes}
        nearest = table.site_order(caller, by_site)
        position = {s: i for i, s in enumerate(nearest)}
        return sorted(routes, key=lambda r: (self.rank(r), position[r.site]))
