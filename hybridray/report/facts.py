"""Facts a report states, derived once from what the demo recorded and from the audit log.

Costs use the topology's prices only: node-hours × ``price_per_node_hour`` for the time each
node ran (up to ``down``, or to the moment it was killed), plus the egress the audit log
charged for every cross-site transfer. Nothing here talks to Ray.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any


def audit_since(records: list[dict[str, Any]], since: float) -> list[dict[str, Any]]:
    return [r for r in records if r.get("ts", 0) >= since]


def cross_site_bytes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bytes and egress cost per (source, destination, what), largest first."""
    sums: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for r in records:
        if r.get("event") == "transfer" and r.get("src") != r.get("dst"):
            what = str(r.get("what") or ("dataset sync" if r.get("sync_id") else "data"))
            what = what.split(" (")[0]
            s = sums[(r["src"], r["dst"], what)]
            s[0] += int(r.get("bytes", 0))
            s[1] += float(r.get("cost", 0.0))
    rows = [{"src": k[0], "dst": k[1], "what": k[2], "bytes": int(v[0]),
             "cost": round(v[1], 6)} for k, v in sums.items()]
    return sorted(rows, key=lambda r: -r["bytes"])


def cost_by_site(facts: dict[str, Any], transfers: list[dict[str, Any]]) -> dict[str, Any]:
    """Per site: node-hours, compute cost, egress cost (charged to the sending site)."""
    end_default = facts.get("down_at") or facts.get("duration_s") or 0.0
    killed = (facts.get("serving") or {}).get("killed") or {}
    sites: dict[str, dict[str, float]] = {}
    for node in facts.get("nodes", []):
        end = killed["at"] if killed.get("pid") == node["pid"] and killed.get("at") \
            else end_default
        hours = max(0.0, end - node.get("up_at", 0.0)) / 3600
        s = sites.setdefault(node["site"], {"node_hours": 0.0, "compute": 0.0, "egress": 0.0,
                                            "price_per_hour": 0.0})
        s["node_hours"] += hours
        s["compute"] += hours * node.get("price_per_hour", 0.0)
        s["price_per_hour"] += node.get("price_per_hour", 0.0)
    for t in transfers:
        s = sites.setdefault(t["src"], {"node_hours": 0.0, "compute": 0.0, "egress": 0.0,
                                        "price_per_hour": 0.0})
        s["egress"] += t["cost"]
    out = {k: {"node_hours": round(v["node_hours"], 6), "compute": round(v["compute"], 6),
               "egress": round(v["egress"], 6), "total": round(v["compute"] + v["egress"], 6),
               "price_per_hour": round(v["price_per_hour"], 4)} for k, v in sites.items()}
    return {"by_site": out, "total": round(sum(v["total"] for v in out.values()), 6)}


def audit_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by event; placement decisions by (site, kind, outcome); every refusal."""
    events = Counter(r.get("event") for r in records)
    decisions: Counter = Counter()
    refusals = []
    for r in records:
        if r.get("event") == "placement":
            decisions[((r.get("sites") or ["?"])[0], r.get("kind", "?"), "placed")] += 1
        elif r.get("event") == "refusal":
            decisions[("none", r.get("kind", "?"), "refused")] += 1
            refusals.append({"workload": r.get("workload"), "kind": r.get("kind"),
                             "data_class": r.get("data_class"), "rule": r.get("rule"),
                             "message": r.get("message")})
        elif r.get("event") == "sync" and r.get("outcome") == "refused":
            refusals.append({"workload": f"sync {r.get('source')} → {r.get('destination')}",
                             "kind": "data", "rule": r.get("rule"),
                             "message": r.get("message")})
    return {"events": dict(events),
            "decisions": [{"site": k[0], "kind": k[1], "outcome": k[2], "count": v}
                          for k, v in sorted(decisions.items())],
            "refusals": refusals}


def restricted_work(facts: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every piece of restricted work and where it ran (as the work itself reported it)."""
    rows = []
    prepared = facts.get("prepared") or {}
    if prepared.get("tickets"):
        rows.append({"what": "tickets written", "ran_at": [prepared["tickets"]["site"]]})
    if prepared.get("corpus"):
        rows.append({"what": "corpus tokenized", "ran_at": prepared["corpus"]["prepared_at_sites"]})
    sync = facts.get("sync") or {}
    for stage, sites in (sync.get("sites") or {}).items():
        if stage in ("read", "encode", "probe", "mask"):
            rows.append({"what": f"sync {stage} (raw rows)", "ran_at": sorted(set(sites))})
    training = facts.get("training") or {}
    if training.get("data_class") == "restricted":
        rows.append({"what": "training workers", "ran_at": sorted(set(training["worker_sites"]))})
    for svc in ((facts.get("serving") or {}).get("services") or {}).values():
        if svc.get("data_class") == "restricted":
            rows.append({"what": "LM replicas", "ran_at": sorted({r["site"] for r in
                                                                 svc["replicas"]})})
            rows.append({"what": "LM ingress", "ran_at": sorted(set(svc["ingress_sites"]))})
    placed = sorted({s for r in records if r.get("event") == "placement"
                     and r.get("data_class") == "restricted" for s in r.get("sites", [])})
    rows.append({"what": "every audited restricted placement (allowed sites)",
                 "ran_at": placed})
    return {"work": rows, "sites": sorted({s for r in rows for s in r["ran_at"]})}


def latency_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """p50/p95/p99 latency (ms) and requests per second, per answering site."""
    by: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r["status"] == 200:
            by[f"{r['kind']}@{r['site']}"].append(r["latency_ms"])
    span = (max(r["t"] for r in records) - min(r["t"] for r in records)) if records else 0
    out = {}
    for key, xs in sorted(by.items()):
        xs.sort()
        out[key] = {"requests": len(xs), "p50_ms": _q(xs, 0.5), "p95_ms": _q(xs, 0.95),
                    "p99_ms": _q(xs, 0.99),
                    "per_s": round(len(xs) / span, 2) if span else None}
    return out


def _q(xs: list[float], q: float) -> float:
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1)
