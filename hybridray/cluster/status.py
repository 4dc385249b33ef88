"""What a recorded cluster is doing now: nodes alive, resources used, drift, and what it costs.

Liveness comes from two witnesses that can disagree: the recorded processes (is the ``ray
start`` process still there?) and the GCS (did the node register, is it still alive?). A
node counts as running, and is paid for, only when every witness that can be asked says so.
An attached cluster has no processes of hybridray's, so there the GCS is the only witness.
Every live node that is not a member, or whose labels claim more than its site may hold, is
reported as drift (``membership.py``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from hybridray import labels as L
from hybridray.audit import AuditLog
from hybridray.cluster import elastic, mirror
from hybridray.cluster.activity import compute_cost
from hybridray.cluster.gcs import GcsNode, GcsView, reachable
from hybridray.cluster.membership import effective_members, find_drift, record_rejoined
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
    """A JSON-ready report on cluster ``name`` (started by ``up`` or attached).

    Keys: ``name``, ``origin`` (``up`` or ``attach``), ``state`` (``up``, ``degraded`` or
    ``down``), ``address``, ``dashboard_url``, ``simulate``, ``created_at``, ``source_file``,
    ``gcs`` (reachable or the error), ``nodes`` (one dict per recorded node, the nodes Ray's
    autoscaler launched with ``elastic: true``; for an attached cluster, per member, from the
    GCS), ``sites`` (per site: nodes, alive, CPU/GPU used and total, price per hour of running
    nodes, ``pools``: static or elastic, min/max, running), ``drift`` (live nodes that are not
    members or whose labels claim more than their site may hold: never placed on),
    ``unrecorded_nodes`` (how many of them are not members), ``price_per_hour`` (the sum),
    ``cost`` (per site: compute $ and node-seconds actually up since ``up``) and
    ``autoscaler`` (what Ray's autoscaler last reported: pending launches, infeasible
    requests; None without elastic pools).

    Raises:
        ClusterNotFound: nothing is recorded under ``name``.
    """
    state = load_state(name, home=home)
    topology = _topology(state)
    gcs: dict[str, Any] = {"reachable": False, "error": None}
    seen: list[GcsNode] = []
    autoscaler: dict[str, Any] | None = None
    head_alive = state.attached or state.head.leader_alive()
    if not head_alive:
        gcs["error"] = "the head process is not running"
    elif not reachable(state.address, 5.0):
        gcs["error"] = f"nothing answers at {state.address}"
    else:
        try:
            with GcsView(state.address, state.token_path, state.tls) as view:
                seen = view.nodes(timeout=5)
                gcs["reachable"] = True
                if state.autoscaler:
                    with contextlib.suppress(Exception):  # its first round may be pending
                        autoscaler = view.autoscaling(timeout=5)
                try:  # records queued inside the cluster (guard refusals) -> the audit log
                    gcs["drained_events"] = mirror.drain_events(
                        view, AuditLog.for_cluster(state.name, state.home), state.name)
                except Exception:
                    pass
        except Exception as e:  # report it; liveness then rests on the processes alone
            gcs["error"] = f"{type(e).__name__}: {e}"
    nodes = _attached_nodes(state, topology, seen, gcs["reachable"]) if state.attached else \
        _process_nodes(state, seen, gcs["reachable"])

    sites: dict[str, dict[str, Any]] = {}
    for site_name in _site_order(topology, state, nodes):
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
            "pools": _pools(site, site_name, mine),
        }
    if state.attached:
        overall = "down" if not gcs["reachable"] else (
            "up" if all(n["running"] for n in nodes) else "degraded")
    else:
        head = next(n for n in nodes if n["role"] == "head")
        if not head["running"]:
            overall = "down"
        elif all(n["running"] for n in nodes if not n["elastic"]):
            overall = "up"   # an autoscaled node starting or stopping is Ray's business
        else:
            overall = "degraded"
    drift = []
    if gcs["reachable"] and topology is not None:
        record_rejoined(state, seen)          # an up node whose Ray restarted in its process
        drift = [d.to_json() for d in find_drift(topology, effective_members(state, seen),
                                                 seen)]
    accrued = compute_cost(state, report={"nodes": nodes})
    return {
        "name": state.name, "origin": state.origin, "state": overall,
        "address": state.address, "dashboard_url": state.dashboard_url,
        "simulate": state.simulate, "created_at": state.created_at,
        "source_file": state.source_file, "overrides": state.overrides, "gcs": gcs,
        "nodes": nodes, "sites": sites, "drift": drift,
        "unrecorded_nodes": sum(1 for d in drift
                                if d["reasons"][0].startswith("not a recorded member")),
        "hosts": "netns" if state.netns else "local",
        "partitioned": list(state.netns.get("partitioned", [])) if state.netns else [],
        "price_per_hour": round(sum(s["price_per_hour"] for s in sites.values()), 6),
        "cost": {k: {"compute": round(v["compute"], 6),
                     "node_seconds": round(v["node_seconds"], 3)} for k, v in accrued.items()},
        "autoscaler": autoscaler,
        "node_types": list(state.autoscaler.get("node_types", [])),
    }


def _process_nodes(state: ClusterState, seen: list[GcsNode], reachable_: bool
                   ) -> list[dict[str, Any]]:
    """One row per node ``up`` started: its process and what the GCS says of it."""
    by_key: dict[str, GcsNode] = {}
    for node in seen:  # a key may have a dead entry and a live one; the live one wins
        if node.key and (node.key not in by_key or node.alive):
            by_key[node.key] = node
    nodes = []
    rows = [(rec, rec.leader_alive(), False) for rec in state.nodes]
    rows += [(rec, rec.raylet_alive(), True) for rec in elastic.load_nodes(state.state_dir)]
    for rec, process_alive, is_elastic in rows:
        info = by_key.get(rec.key)
        gcs_alive = (info is not None and info.alive) if reachable_ else None
        running = process_alive and gcs_alive is not False
        row = _resources(info, float(rec.cpus), float(rec.gpus))
        nodes.append({
            "key": rec.key, "site": rec.site, "pool": rec.pool,
            "role": "worker" if is_elastic else rec.role, "elastic": is_elastic,
            "index": rec.seq if is_elastic else rec.index,
            "pid": rec.raylet_pid if is_elastic else rec.pid,
            "node_id": info.node_id if info else rec.node_id,
            "process_alive": process_alive, "gcs_alive": gcs_alive, "running": running,
            **row, "price_per_hour": rec.price_per_hour if running else 0.0,
            "started_at": None,
            "log": f"{rec.temp_dir}/session_latest/logs" if is_elastic else rec.log,
        })
    return nodes


def _attached_nodes(state: ClusterState, topology: Topology | None, seen: list[GcsNode],
                    reachable_: bool) -> list[dict[str, Any]]:
    """One row per member of an attached cluster, from the GCS alone (no processes)."""
    by_id = {n.node_id: n for n in seen}
    nodes = []
    for i, m in enumerate(state.members):
        info = by_id.get(m.node_id)
        gcs_alive = (info is not None and info.alive) if reachable_ else None
        running = bool(gcs_alive)
        labels = info.labels if info else {}
        price = _pool_price(topology, m.site, m.pool) if running else 0.0
        role = labels.get(L.ROLE, "worker" if m.pool else "head")
        nodes.append({
            "key": m.key or f"{m.site}.{m.pool or role}.{m.node_id[:8]}", "site": m.site,
            "pool": m.pool, "role": role, "elastic": False,
            "index": i, "pid": None, "node_id": m.node_id, "process_alive": None,
            "gcs_alive": gcs_alive, "running": running,
            **_resources(info, 0.0, 0.0), "price_per_hour": price,
            "started_at": (info.started_ms / 1000) if info and info.started_ms else None,
            "log": None,
        })
    return nodes


def _resources(info: GcsNode | None, cpus: float, gpus: float) -> dict[str, Any]:
    out: dict[str, Any] = {"cpus_total": cpus, "cpus_used": None, "gpus_total": gpus,
                           "gpus_used": None}
    if info is not None and info.alive:
        out["cpus_total"] = info.total.get("CPU", cpus)
        out["gpus_total"] = info.total.get("GPU", gpus)
        if info.available:
            out["cpus_used"] = out["cpus_total"] - info.available.get("CPU", 0.0)
            out["gpus_used"] = out["gpus_total"] - info.available.get("GPU", 0.0)
    return out


def _pool_price(topology: Topology | None, site: str, pool: str | None) -> float:
    if topology is None or pool is None or site not in topology.sites:
        return 0.0
    return next((p.price_per_node_hour for p in topology.sites[site].pools if p.name == pool),
                0.0)


def _pools(site: Any, site_name: str, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pool: static or elastic (min, max, idle timeout) and how many nodes run."""
    if site is None:
        return {}
    out = {}
    for pool in site.pools:
        running = sum(1 for n in nodes if n["pool"] == pool.name and n["running"])
        row: dict[str, Any] = {"elastic": pool.elastic, "running": running,
                               "min": pool.min_nodes, "max": pool.max_nodes}
        if pool.elastic:
            row["idle_timeout_s"] = pool.idle_timeout
        out[pool.name] = row
    return out


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
        if state.attached:   # no processes to look at: its members, as recorded
            out.append({
                "name": name, "state": "attached", "nodes_alive": None,
                "nodes": len(state.members), "sites": sorted({m.site for m in state.members}),
                "address": state.address, "dashboard_url": state.dashboard_url,
                "simulate": False, "created_at": state.created_at, "price_per_hour": None,
                "origin": state.origin})
            continue
        alive = [n for n in state.nodes if n.leader_alive()]
        autoscaled = [n for n in elastic.load_nodes(state.state_dir) if n.raylet_alive()]
        head_up = state.head.leader_alive() if state.nodes else False
        out.append({
            "origin": state.origin,
            "name": name,
            "state": ("up" if len(alive) == len(state.nodes) else "degraded") if head_up
            else "down",
            "nodes_alive": len(alive) + len(autoscaled),
            "nodes": len(state.nodes) + len(autoscaled),
            "sites": sorted({n.site for n in state.nodes}),
            "address": state.address, "dashboard_url": state.dashboard_url,
            "simulate": state.simulate, "created_at": state.created_at,
            "price_per_hour": round(sum(n.price_per_hour for n in [*alive, *autoscaled]), 6),
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


def _site_order(topology: Topology | None, state: ClusterState,
                nodes: list[dict[str, Any]]) -> list[str]:
    order = list(topology.sites) if topology else []
    return order + list(dict.fromkeys(n["site"] for n in nodes if n["site"] not in order))
