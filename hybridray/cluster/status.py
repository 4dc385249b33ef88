"""What a recorded cluster is doing now: nodes alive, resources used, and what it costs.

Liveness comes from two witnesses that can disagree: the recorded processes (is the ``ray
start`` process still there?) and the GCS (did the node register, is it still alive?). A
node counts as running, and is paid for, only when every witness that can be asked says so.
"""

from __future__ import annotations

import os
from typing import Any

from hybridray.cluster.gcs import GcsNode, GcsView
from hybridray.cluster.state import ClusterState, list_clusters, load_state
from hybridray.exceptions import ClusterNotFound, ConfigError
from hybridray.topology.models import Topology


def ray_env(state: ClusterState) -> dict[str, str]:
    """Environment a driver, ``ray job submit`` or ``hybridray.connect()`` needs for ``state``.

    A driver connects with ``os.environ.update(ray_env(state)); ray.init(address=state.address)``.
    ``RAY_API_SERVER_ADDRESS`` (the dashboard, for ``ray job``) is set only when it runs.
    """
    env = {"RAY_ADDRESS": state.address, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": state.token_path, "RAY_USAGE_STATS_ENABLED": "0",
           "HYBRIDRAY_CLUSTER": state.name, "HYBRIDRAY_HOME": state.home}
    if state.dashboard_url:
        env["RAY_API_SERVER_ADDRESS"] = state.dashboard_url
    env.update(state.tls)  # RAY_USE_TLS and the certificate every driver must present
    if state.netns:
        from hybridray.cluster.nshosts import storage_env

        env.update(storage_env(state))  # its emulated S3 is not on loopback
    return env


def status(name: str, *, home: str | os.PathLike | None = None) -> dict[str, Any]:
    """A JSON-ready report on cluster ``name``.

    Keys: ``name``, ``state`` (``up``, ``degraded`` or ``down``), ``address``,
    ``dashboard_url``, ``simulate``, ``created_at``, ``source_file``, ``gcs`` (reachable or
    the error), ``nodes`` (one dict per recorded node), ``sites`` (per site: nodes, alive,
    CPU/GPU used and total, price per hour of running nodes), ``unrecorded_nodes`` (alive in
    the GCS but not started by hybridray) and ``price_per_hour`` (the sum).

    Raises:
        ClusterNotFound: nothing is recorded under ``name``.
    """
    state = load_state(name, home=home)
    topology = _topology(state)
    gcs: dict[str, Any] = {"reachable": False, "error": None}
    seen: list[GcsNode] = []
    if state.head.leader_alive():
        try:
            with GcsView(state.address, state.token_path, state.tls) as view:
                seen = view.nodes(timeout=5)
            gcs["reachable"] = True
        except Exception as e:  # report it; liveness then rests on the processes alone
            gcs["error"] = f"{type(e).__name__}: {e}"
    else:
        gcs["error"] = "the head process is not running"
    by_key: dict[str, GcsNode] = {}
    for node in seen:  # a key may have a dead entry and a live one; the live one wins
        if node.key and (node.key not in by_key or node.alive):
            by_key[node.key] = node

    nodes = []
    for rec in state.nodes:
        process_alive = rec.leader_alive()
        info = by_key.get(rec.key)
        gcs_alive = (info is not None and info.alive) if gcs["reachable"] else None
        running = process_alive and gcs_alive is not False
        cpus_total, gpus_total = float(rec.cpus), float(rec.gpus)
        cpus_used = gpus_used = None
        if info is not None and info.alive and info.available:
            cpus_total = info.total.get("CPU", 0.0)
            gpus_total = info.total.get("GPU", 0.0)
            cpus_used = cpus_total - info.available.get("CPU", 0.0)
            gpus_used = gpus_total - info.available.get("GPU", 0.0)
        nodes.append({
            "key": rec.key, "site": rec.site, "pool": rec.pool, "role": rec.role,
            "index": rec.index, "pid": rec.pid, "node_id": info.node_id if info else rec.node_id,
            "process_alive": process_alive, "gcs_alive": gcs_alive, "running": running,
            "cpus_total": cpus_total, "cpus_used": cpus_used,
            "gpus_total": gpus_total, "gpus_used": gpus_used,
            "price_per_hour": rec.price_per_hour if running else 0.0,
            "log": rec.log,
        })

    sites: dict[str, dict[str, Any]] = {}
    for site_name in _site_order(topology, state):
        site = topology.sites.get(site_name) if topology else None
        mine = [n for n in nodes if n["site"] == site_name]
        up = [n for n in mine if n["running"]]
        sites[site_name] = {
            "kind": site.kind.value if site else None,
            "provider": site.provider.value if site else None,
            "nodes": len(mine), "alive": len(up),
            "cpus_total": sum(n["cpus_total"] for n in up),
            "cpus_used": sum(n["cpus_used"] or 0.0 for n in up),
            "gpus_total": sum(n["gpus_total"] for n in up),
            "gpus_used": sum(n["gpus_used"] or 0.0 for n in up),
            "price_per_hour": round(sum(n["price_per_hour"] for n in up), 6),
        }
    head = next(n for n in nodes if n["role"] == "head")
    if not head["running"]:
        overall = "down"
    elif all(n["running"] for n in nodes):
        overall = "up"
    else:
        overall = "degraded"
    recorded = {rec.key for rec in state.nodes}
    return {
        "name": state.name, "state": overall, "address": state.address,
        "dashboard_url": state.dashboard_url, "simulate": state.simulate,
        "created_at": state.created_at, "source_file": state.source_file,
        "overrides": state.overrides, "gcs": gcs, "nodes": nodes, "sites": sites,
        "unrecorded_nodes": sum(1 for n in seen if n.alive and n.key not in recorded),
        "hosts": "netns" if state.netns else "local",
        "partitioned": list(state.netns.get("partitioned", [])) if state.netns else [],
        "price_per_hour": round(sum(s["price_per_hour"] for s in sites.values()), 6),
    }


def cluster_summaries(home: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One line per recorded cluster from its processes alone (no GCS round trip)."""
    out = []
    for name in list_clusters(home):
        try:
            state = load_state(name, home=home)
        except ClusterNotFound:  # brought down while we were listing
            continue
        except Exception as e:
            out.append({"name": name, "state": "unreadable", "error": str(e)})
            continue
        alive = [n for n in state.nodes if n.leader_alive()]
        head_up = state.head.leader_alive() if state.nodes else False
        out.append({
            "name": name,
            "state": ("up" if len(alive) == len(state.nodes) else "degraded") if head_up
            else "down",
            "nodes_alive": len(alive), "nodes": len(state.nodes),
            "sites": sorted({n.site for n in state.nodes}),
            "address": state.address, "dashboard_url": state.dashboard_url,
            "simulate": state.simulate, "created_at": state.created_at,
            "price_per_hour": round(sum(n.price_per_hour for n in alive), 6),
        })
    return out


def _topology(state: ClusterState) -> Topology | None:
    """What runs: the snapshot taken at ``up`` (the file may have been edited since)."""
    try:
        return Topology.model_validate(state.topology_snapshot)
    except ValueError:
        try:
            return state.topology()
        except (ConfigError, ValueError):
            return None


def _site_order(topology: Topology | None, state: ClusterState) -> list[str]:
    order = list(topology.sites) if topology else []
    return order + [n.site for n in state.nodes if n.site not in order]
