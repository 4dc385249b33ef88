"""The one place a ``Placement`` becomes Ray's own scheduling options.

Each candidate site becomes a label selector on ``hybridray.io/site``, also pinned to nodes
whose ``hybridray.io/max-data-class`` admits the data (so a mislabelled site list cannot leak
data). The first candidate is the primary ``label_selector``; the rest become Ray's
``fallback_strategy`` in order, so *Ray* bursts to the next site when the first is full.

Every other constraint the policy decided is compiled too, into every selector (primary and
fallbacks alike, for tasks, actors, Train workers, Serve replicas, Data stages and job
entrypoints): the accelerator (``ray.io/accelerator-type``), the market (``ray.io/market-type:
on-demand`` unless spot is allowed) and the pools that fit one unit (``hybridray.io/pool``,
when fewer than all of a site's pools fit). A decision for an on-demand H100 can then never
start on a spot A10G, whatever the node's free resources say.

Nodes the placement must avoid (drift: live nodes that are not members of the cluster, see
``hybridray.cluster.membership``) are excluded from every selector by Ray's own
``ray.io/node-id`` label, which a node cannot set for itself. Ray's fallbacks *replace* the
primary selector, so each one carries the exclusion too.
"""

from __future__ import annotations

from typing import Any

from hybridray import labels as L
from hybridray.placement.decision import Placement
from hybridray.topology.models import DataClass

# Fallbacks beyond this many are merged into one final ``in(...)`` selector: Ray tries each
# fallback in turn, so a 50-site list would be slow to schedule for little gain in order.
MAX_ORDERED_FALLBACKS = 8

_CLASS_SELECTOR = {c: f"in({','.join(x.value for x in c.at_least())})" for c in DataClass}
NODE_ID = "ray.io/node-id"   # Ray's default label: the node's own id


def _avoiding(selector: dict[str, str], placement: Placement) -> dict[str, str]:
    """``selector`` that also keeps off the placement's drift nodes."""
    if placement.avoid_nodes:
        selector[NODE_ID] = f"!in({','.join(placement.avoid_nodes)})"
    return selector


def constraint_selector(placement: Placement) -> dict[str, str]:
    """The labels every node running this workload must carry, whatever its site: the data
    class it may hold, the accelerator and the market (on-demand unless spot is allowed)."""
    wl = placement.workload
    out = {L.MAX_DATA_CLASS: _CLASS_SELECTOR[wl.data_class]}
    if wl.accelerator:
        out[L.ACCELERATOR] = wl.accelerator
    if not wl.spot_ok:
        out[L.MARKET_TYPE] = "on-demand"
    return out


def site_selector(placement: Placement, site: str) -> dict[str, str]:
    """Label selector for one candidate site with every decided constraint."""
    return _site_selector(placement, site, constraint_selector(placement),
                          _pools_by_site(placement))


def _pools_by_site(placement: Placement) -> dict[str, tuple[str, ...]]:
    """Each candidate site's decided pools (the first candidate of a site counts)."""
    out: dict[str, tuple[str, ...]] = {}
    for c in placement.candidates:
        out.setdefault(c.site, tuple(c.pools))
    return out


def _site_selector(placement: Placement, site: str, constraint: dict[str, str],
                   pools_by_site: dict[str, tuple[str, ...]]) -> dict[str, str]:
    sel = {L.SITE: site, **constraint}
    pools = pools_by_site.get(site, ())
    if pools:
        sel[L.POOL] = pools[0] if len(pools) == 1 else f"in({','.join(pools)})"
    return _avoiding(sel, placement)


def selectors(placement: Placement) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(primary label_selector, fallback_strategy) for a placed workload."""
    placement.raise_if_refused()
    sites = placement.sites
    # Computed once per placement: a 50-site fallback list would otherwise scan every
    # candidate once per site (quadratic in the sites).
    constraint = constraint_selector(placement)
    pools = _pools_by_site(placement)
    primary = _site_selector(placement, sites[0], constraint, pools)
    ordered = sites[1:1 + MAX_ORDERED_FALLBACKS]
    fallback = [{"label_selector": _site_selector(placement, s, constraint, pools)}
                for s in ordered]
    rest = sites[1 + MAX_ORDERED_FALLBACKS:]
    if rest:
        # One merged selector for the tail: a pool set per site cannot be expressed there, so
        # only tail sites without a pool restriction are kept (the decided pools of the
        # others would be lost, which is exactly what this module exists to prevent).
        free = [s for s in rest if not pools.get(s)]
        if free:
            fallback.append({"label_selector": _avoiding(
                {L.SITE: f"in({','.join(free)})", **constraint}, placement)})
    return primary, fallback


def _resources(placement: Placement) -> dict[str, Any]:
    wl = placement.workload
    out: dict[str, Any] = {"num_cpus": wl.cpus, "num_gpus": wl.gpus}
    if wl.memory_gb:
        out["memory"] = int(wl.memory_gb * 2**30)
    return out


def task_options(placement: Placement) -> dict[str, Any]:
    """Options for ``fn.options(**opts)`` / ``@ray.remote(**opts)`` (tasks and actors)."""
    primary, fallback = selectors(placement)
    opts = {**_resources(placement), "label_selector": primary}
    if fallback:
        opts["fallback_strategy"] = fallback
    return opts


actor_options = task_options


def serve_options(placement: Placement) -> dict[str, Any]:
    """Keyword arguments for ``serve.deployment(...)`` / ``Deployment.options(...)``."""
    return {"ray_actor_options": task_options(placement)}


def data_remote_args(placement: Placement) -> dict[str, Any]:
    """``ray_remote_args`` for a Ray Data stage (``map_batches``, ``read_*``, ``write_*``)."""
    return task_options(placement)


def train_label_selectors(placement: Placement, num_workers: int | None = None
                          ) -> list[dict[str, str]]:
    """One selector per Ray Train worker, filling candidate sites in order (``assign``)."""
    return [site_selector(placement, s) for s in placement.assign(num_workers)]


def scaling_config(placement: Placement, num_workers: int | None = None, **kwargs: Any):
    """A ``ray.train.ScalingConfig`` with a per-worker ``label_selector`` from the placement."""
    from ray.train import ScalingConfig

    wl = placement.workload
    n = wl.count if num_workers is None else num_workers
    kwargs.setdefault("use_gpu", wl.gpus > 0)
    resources = {"CPU": wl.cpus}
    if wl.gpus:
        resources["GPU"] = wl.gpus
    kwargs.setdefault("resources_per_worker", resources)
    return ScalingConfig(num_workers=n, label_selector=train_label_selectors(placement, n),
                         **kwargs)


def job_submit_kwargs(placement: Placement) -> dict[str, Any]:
    """Keyword arguments for ``JobSubmissionClient.submit_job`` placing the entrypoint."""
    primary, _ = selectors(placement)
    wl = placement.workload
    out: dict[str, Any] = {"entrypoint_label_selector": primary}
    if wl.cpus:
        out["entrypoint_num_cpus"] = wl.cpus
    if wl.gpus:
        out["entrypoint_num_gpus"] = wl.gpus
    return out
