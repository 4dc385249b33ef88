"""What a running cluster has been doing since ``up``, read from its audit log and records.

``status`` answers "what runs now" from processes and the GCS; this answers "what work is on
it, what moved between sites, and what it has cost so far": trainings started and not yet
ended, services placed, syncs, bytes per link, placement decisions, and accrued cost (each
running node's price × the hours since its process started, plus the egress the audit log
charged). Used by ``hybridray status --watch`` and the Prometheus exporter.
"""

from __future__ import annotations

import datetime
import os
import time
from collections import Counter
from typing import Any

from hybridray.audit import AuditLog
from hybridray.cluster import elastic
from hybridray.cluster.state import ClusterState, load_state


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def node_started_at(start_ticks: int) -> float:
    """Epoch seconds of a process start time given in clock ticks since boot (/proc)."""
    return _boot_time() + start_ticks / os.sysconf("SC_CLK_TCK")


def _created(state: ClusterState) -> float:
    try:
        return datetime.datetime.fromisoformat(state.created_at).timestamp()
    except (TypeError, ValueError):
        return 0.0


def _zero() -> dict[str, float]:
    return {"compute": 0.0, "egress": 0.0, "rate_per_hour": 0.0, "node_seconds": 0.0}


def compute_cost(state: ClusterState, records: list[dict[str, Any]] | None = None, *,
                 now: float | None = None, report: dict[str, Any] | None = None
                 ) -> dict[str, dict[str, float]]:
    """Compute cost per site, per node-second actually up.

    A static node is paid from its process start to now while it runs; a node Ray's
    autoscaler launched from its ``node-launch`` to its ``node-stop`` audit record (or now,
    while it runs); a member of an attached cluster (no processes of ours) from the later of
    its registration with the GCS and the attach, while ``status`` (``report``) says it runs.
    Keys per site: ``compute`` ($), ``node_seconds``, ``rate_per_hour`` (the nodes running
    now), ``egress`` (0 here; ``activity`` adds the audit log's).
    """
    now = time.time() if now is None else now
    since = _created(state) - 1
    if records is None:
        records = [r for r in AuditLog.for_cluster(state.name, state.home)
                   if r.get("ts", 0) >= since]
    cost = {site: _zero() for site in (state.topology_snapshot.get("sites") or {})}
    if state.attached:
        if report is None:
            from hybridray.cluster.status import status

            report = status(state.name, home=state.home)
        for n in report["nodes"]:
            c = cost.setdefault(n["site"], _zero())
            if n["running"]:
                seconds = max(0.0, now - max(n["started_at"] or since + 1, since + 1))
                c["node_seconds"] += seconds
                c["compute"] += seconds / 3600 * n["price_per_hour"]
                c["rate_per_hour"] += n["price_per_hour"]
        return cost
    for node in state.nodes:
        c = cost.setdefault(node.site, _zero())
        if node.leader_alive():
            seconds = max(0.0, now - node_started_at(node.start_time))
            c["node_seconds"] += seconds
            c["compute"] += seconds / 3600 * node.price_per_hour
            c["rate_per_hour"] += node.price_per_hour
    alive = {n.key for n in elastic.load_nodes(state.state_dir) if n.raylet_alive()}
    for span in elastic.spans(records, now=now, since=_created(state) - 1, alive=alive):
        c = cost.setdefault(span.site, _zero())
        c["node_seconds"] += span.seconds
        c["compute"] += span.cost
        if span.running:
            c["rate_per_hour"] += span.price_per_hour
    return cost


def activity(name: str, *, home: str | os.PathLike | None = None,
             now: float | None = None, state: ClusterState | None = None,
             report: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready summary of cluster ``name``'s work since it came up.

    Keys: ``since`` (epoch), ``trainings`` (running: started, not ended), ``services``
    (name → sites of its replicas, from the latest serve placements), ``syncs`` (the last
    few, with outcome), ``bytes`` ((src, dst) → bytes and egress $), ``decisions``
    ((site, kind, outcome) → count), ``cost`` (site → accrued compute and egress $,
    ``node_seconds`` actually up, ``rate_per_hour``; see ``compute_cost``), ``nodes`` (the
    autoscaled nodes' launches and stops: key, site, pool, start, end, running, reason). An
    attached cluster's compute cost comes from its running members as ``status`` reports them
    (``report``, read here when not given): each member's pool price since the later of its
    registration with the GCS and the attach.

    Raises:
        ClusterNotFound: nothing is recorded under ``name``.
    """
    state = state or load_state(name, home=home)
    now = time.time() if now is None else now
    since = _created(state) - 1
    records = [r for r in AuditLog.for_cluster(name, home) if r.get("ts", 0) >= since]
    started: dict[str, dict[str, Any]] = {}
    services: dict[str, set[str]] = {}
    syncs: list[dict[str, Any]] = []
    links: dict[tuple[str, str], list[float]] = {}
    decisions: Counter = Counter()
    for r in records:
        ev = r.get("event")
        if ev == "train-start":
            started[r.get("run")] = {"run": r.get("run"), "sites": r.get("sites"),
                                     "data_class": r.get("data_class"), "since": r["ts"]}
        elif ev == "train-end":
            started.pop(r.get("run"), None)
        elif ev == "sync":
            syncs.append({"source": r.get("source"), "destination": r.get("destination"),
                          "outcome": r.get("outcome"), "bytes_moved": r.get("bytes_moved", 0),
                          "ts": r["ts"]})
        elif ev == "transfer" and r.get("src") != r.get("dst"):
            link = links.setdefault((r["src"], r["dst"]), [0, 0.0])
            link[0] += int(r.get("bytes", 0))
            link[1] += float(r.get("cost", 0.0))
        elif ev in ("placement", "refusal"):
            outcome = "placed" if ev == "placement" else "refused"
            site = (r.get("sites") or ["none"])[0] if outcome == "placed" else "none"
            decisions[(site, r.get("kind", "task"), outcome)] += 1
            if ev == "placement" and r.get("source") == "serve" and r.get("service"):
                services.setdefault(r["service"], set()).update(r.get("sites", [])[:1])
    cost = compute_cost(state, records, now=now, report=report)
    rate = sum(c["rate_per_hour"] for c in cost.values())
    for (src, _dst), (_, dollars) in links.items():
        cost.setdefault(src, _zero())
        cost[src]["egress"] += dollars
    return {
        "since": since + 1,
        "trainings": list(started.values()),
        "services": {k: sorted(v) for k, v in services.items()},
        "syncs": syncs[-5:],
        "bytes": [{"src": s, "dst": d, "bytes": int(v[0]), "cost": round(v[1], 6)}
                  for (s, d), v in sorted(links.items())],
        "decisions": [{"site": k[0], "kind": k[1], "outcome": k[2], "count": v}
                      for k, v in sorted(decisions.items())],
        "cost": {k: {kk: round(vv, 6) for kk, vv in v.items()} for k, v in cost.items()},
        "nodes": [{"key": s.key, "site": s.site, "pool": s.pool, "start": s.start,
                   "end": s.end, "running": s.running, "reason": s.reason,
                   "cost": round(s.cost, 6)}
                  for s in elastic.spans(records, now=now, since=since, alive={
                      n.key for n in elastic.load_nodes(state.state_dir) if n.raylet_alive()})],
        "rate_per_hour": round(rate, 6),
    }
