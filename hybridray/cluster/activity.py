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


def activity(name: str, *, home: str | os.PathLike | None = None,
             now: float | None = None, state: ClusterState | None = None,
             report: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready summary of cluster ``name``'s work since it came up.

    Keys: ``since`` (epoch), ``trainings`` (running: started, not ended), ``services``
    (name → sites of its replicas, from the latest serve placements), ``syncs`` (the last
    few, with outcome), ``bytes`` ((src, dst) → bytes and egress $), ``decisions``
    ((site, kind, outcome) → count), ``cost`` (site → accrued compute and egress $,
    ``rate_per_hour``). An attached cluster's compute cost comes from its running members as
    ``status`` reports them (``report``, read here when not given): each member's pool price
    since the later of its registration with the GCS and the attach.

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
    cost: dict[str, dict[str, float]] = {}
    rate = 0.0
    running: list[tuple[str, float, float]] = []     # (site, started at, price per hour)
    if state.attached:
        if report is None:
            from hybridray.cluster.status import status

            report = status(name, home=home)
        running = [(n["site"], max(n["started_at"] or since + 1, since + 1),
                    n["price_per_hour"]) for n in report["nodes"] if n["running"]]
        for n in report["nodes"]:
            cost.setdefault(n["site"], {"compute": 0.0, "egress": 0.0, "rate_per_hour": 0.0})
    else:
        for node in state.nodes:
            cost.setdefault(node.site, {"compute": 0.0, "egress": 0.0, "rate_per_hour": 0.0})
            if node.leader_alive():
                running.append((node.site, node_started_at(node.start_time),
                                node.price_per_hour))
    for site, started_at, price in running:
        c = cost[site]
        c["compute"] += max(0.0, now - started_at) / 3600 * price
        c["rate_per_hour"] += price
        rate += price
    for (src, _dst), (_, dollars) in links.items():
        cost.setdefault(src, {"compute": 0.0, "egress": 0.0, "rate_per_hour": 0.0})
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
        "rate_per_hour": round(rate, 6),
    }
