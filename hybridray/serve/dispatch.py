"""Sending one request to a (model, version): sites in order, failing over, two passes.

First pass: each site, best first (see ``routing``), gets ``ingress.assign_timeout_s`` to take
the request; a site whose replicas are busy, whose queue is full (``max_queued_requests``), or
that is gone is passed over and, unless merely full, marked suspect. Second pass, when every
site only timed out: wait until the deadline at the best site that was healthy before this
request, i.e. queue where capacity should free up rather than refuse.
"""

import asyncio
import time
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from hybridray.serve import errors
from hybridray.serve.routing import ModelRoutes, Route, RoutingTable, SiteHealth

# Errors that mean "this site cannot answer now", not "this request is bad": try the next.
SITE_DOWN = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)


async def _assigned(response) -> None:
    """Wait until Serve has assigned ``response`` to a replica (not for its result).

    Uses the response's private future: Ray 2.60 has no public "assigned" signal, and its
    public ``choose_replica``/``dispatch`` pair rejects reservations made across loops.
    """
    await response._fetch_future_result_async()


class Dispatcher:
    """Handles to replica deployments, their health, and the failover call."""

    def __init__(self, service: str, app_name: str, bound: dict[str, Any], metrics):
        self.service, self.app_name, self.bound, self.metrics = service, app_name, bound, metrics
        self.handles: dict[tuple, Any] = {}
        self.health = SiteHealth()
        self.table = RoutingTable({})
        self.assign_s = 2.0
        self.limit_s = 30.0
        self.retry_after_s = 1.0

    def handle(self, route: Route, method: str, stream: bool = False):
        """The handle for ``method`` of a route's deployment (cached per method)."""
        key = (route.app, route.deployment)
        handle = self.handles.get(key)
        if handle is None:
            handle = self.bound.get(route.deployment) if route.app == self.app_name else None
            if handle is None:
                handle = serve.get_deployment_handle(route.deployment, app_name=route.app)
            self.handles[key] = handle
        opts = (key, method, stream)
        if opts not in self.handles:
            self.handles[opts] = handle.options(method_name=method, stream=stream)
        return self.handles[opts]

    async def call(self, model: ModelRoutes, version: str, method: str, args: tuple,
                   caller: str | None, deadline: float, *, stream: bool = False):
        """Call ``method`` at the best site, failing over (two passes, see above); returns
        ``(result, route)``.

        For ``stream``, the result is ``(first chunk, generator)``. Raises ``HTTPError`` 503
        when no site can take it, 504 when the deadline passes.
        """
        assign_s = self.assign_s
        routes = self.health.order(self.table, model.routes[version], caller)
        healthy_before = {r: self.health.rank(r) == 0 for r in routes}
        tried: list[str] = []
        waiting: list[Route] = []
        for route in routes:
            outcome = await self._attempt(route, method, args, stream, deadline, assign_s)
            if isinstance(outcome, str):
                tried.append(f"{route.site}: {outcome}")
                if outcome.startswith("no replica free"):
                    waiting.append(route)
                continue
            return self._answered(outcome, route, routes, tried)
        queue_at = [r for r in waiting if healthy_before[r]]
        if queue_at and time.monotonic() < deadline:
            route = queue_at[0]
            outcome = await self._attempt(route, method, args, stream, deadline, None)
            if not isinstance(outcome, str):
                return self._answered(outcome, route, routes, tried)
            tried.append(f"{route.site}: {outcome}")
        if time.monotonic() >= deadline:
            raise errors.timeout(self.limit_s)
        raise errors.unavailable("no site could take the request (" + "; ".join(tried) + ")",
                                 self.retry_after_s)

    async def _attempt(self, route: Route, method: str, args: tuple, stream: bool,
                       deadline: float, assign_s: float | None):
        """One site: the result (``(first, generator)`` for streams), or why not (a str)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "deadline passed"
        response = self.handle(route, method, stream).remote(*args)
        assigned = False
        try:
            async with asyncio.timeout(remaining if assign_s is None
                                       else min(assign_s, remaining)):
                await _assigned(response)
            assigned = True
            async with asyncio.timeout(deadline - time.monotonic()):
                if stream:
                    return (await response.__anext__(), response)
                return await response
        except asyncio.TimeoutError:
            response.cancel()
            if assigned:
                raise errors.timeout(self.limit_s) from None
            self.health.suspect(route)
            return f"no replica free within {assign_s or remaining:.3g}s"
        except BackPressureError:
            return "queue full"
        except SITE_DOWN as e:
            self.health.suspect(route)
            return type(e).__name__

    def _answered(self, result, route: Route, routes: list[Route], tried: list[str]):
        self.health.clear(route)
        if tried:
            self.metrics.failovers.inc(tags={
                "service": self.service, "model": route.model, "from_site": routes[0].site,
                "to_site": route.site, "reason": tried[0].split(": ", 1)[1][:40]})
        return result, route
