"""The report's PNG plots (matplotlib, headless): training, serving, cost, bytes."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

COLORS = {"onprem": "#2b6cb0", "cloud-a": "#dd6b20", "cloud-b": "#38a169", "None": "#a0aec0"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training(facts: dict[str, Any], path: Path) -> Path | None:
    t = facts.get("training") or {}
    if not t.get("history") and not t.get("eval_history"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    hist = [h for h in t.get("history", []) if h.get("loss") is not None]
    if hist:
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], "o-", label="train loss")
    ev = t.get("eval_history") or []
    if ev:
        ax.plot([e[0] for e in ev], [e[1] for e in ev], "s--", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(f"{t.get('run')}: {len(t.get('worker_sites', []))} DDP workers at "
                 f"{', '.join(sorted(set(t.get('worker_sites', []))))}, {t.get('precision')}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def serving(facts: dict[str, Any], path: Path) -> Path | None:
    s = facts.get("serving") or {}
    load = s.get("load") or {}
    records = load.get("records") or []
    if not records:
        return None
    plt = _plt()
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    kill = (load.get("marks") or {}).get("kill")
    by_site: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_site[str(r["site"]) if r["status"] == 200 else "failed"].append(r)
    for site, rs in sorted(by_site.items()):
        ax1.scatter([r["t"] for r in rs], [r["latency_ms"] for r in rs], s=6,
                    color=COLORS.get(site, "#e53e3e"), label=site, alpha=0.7)
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms)")
    ax1.set_title("every request: latency by answering site")
    end = int(max(r["t"] for r in records)) + 1
    sites = sorted({str(r["site"]) for r in records if r["status"] == 200})
    bottom = [0] * end
    for site in sites:
        counts = [0] * end
        for r in records:
            if r["status"] == 200 and str(r["site"]) == site:
                counts[int(r["t"])] += 1
        ax2.bar(range(end), counts, bottom=bottom, width=1.0, color=COLORS.get(site),
                label=site, align="edge")
        bottom = [a + b for a, b in zip(bottom, counts, strict=True)]
    failed = [0] * end
    for r in records:
        if r["status"] != 200:
            failed[int(r["t"])] += 1
    if any(failed):
        ax2.bar(range(end), failed, bottom=bottom, width=1.0, color="#e53e3e", label="failed",
                align="edge")
    ax2.set_ylabel("answered / s")
    ax2.set_title("throughput by answering site")
    timeline = s.get("replicas_timeline") or []
    keys = sorted({k for row in timeline for k in row if k != "t"})
    for k in keys:
        ax3.step([row["t"] for row in timeline], [row.get(k, 0) for row in timeline],
                 where="post", label=k, color=COLORS.get(k.split("@")[-1]))
    ax3.set_ylabel("running replicas")
    ax3.set_xlabel("seconds since the load started")
    ax3.set_title("autoscaling per model and site")
    for ax in (ax1, ax2, ax3):
        if kill is not None:
            ax.axvline(kill, color="#e53e3e", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    if kill is not None:
        ax1.annotate(f"{(s.get('killed') or {}).get('site')} node killed", (kill, 1),
                     xycoords=("data", "axes fraction"), va="top", fontsize=8, color="#e53e3e")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cost(facts: dict[str, Any], path: Path) -> Path | None:
    by_site = (facts.get("cost") or {}).get("by_site") or {}
    if not by_site:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(by_site)
    compute = [by_site[k]["compute"] for k in names]
    egress = [by_site[k]["egress"] for k in names]
    ax.bar(names, compute, label="compute (node-hours × price)", color="#4a5568")
    ax.bar(names, egress, bottom=compute, label="egress", color="#ed8936")
    ax.set_ylabel("US$")
    ax.set_title("what the demo cost, by site")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def transfers(facts: dict[str, Any], path: Path) -> Path | None:
    rows = facts.get("cross_site_bytes") or []
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    labels = [f"{r['src']} → {r['dst']}: {r['what']}" for r in rows]
    ax.barh(labels, [r["bytes"] / 1e6 for r in rows], color="#805ad5")
    ax.set_xlabel("MB")
    ax.set_title("bytes across sites")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def link_rates(facts: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Mbit/s of each shaped link between consecutive samples: ``{"a->b": [(t, mbps)]}``."""
    samples = (facts.get("links") or {}).get("samples") or []
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for prev, cur in zip(samples, samples[1:], strict=False):
        dt = cur["t"] - prev["t"]
        if dt <= 0:
            continue
        for link, n in cur["bytes"].items():
            if link in prev["bytes"]:
                out[link].append((cur["t"], max(0, n - prev["bytes"][link]) * 8 / 1e6 / dt))
    return dict(out)


def links(facts: dict[str, Any], path: Path) -> Path | None:
    """Traffic per shaped link (namespace hosts) against the rate it is shaped to."""
    info = facts.get("links") or {}
    rates = link_rates(facts)
    busy = sorted(k for k, v in rates.items() if any(m > 0.01 for _, m in v))
    if not busy:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(busy), 1, figsize=(8, 1.9 * len(busy) + 0.6), sharex=True,
                             squeeze=False)
    partition = ((facts.get("serving") or {}).get("load") or {}).get("marks") or {}
    start = (facts.get("serving") or {}).get("load_started_at")
    for ax, link in zip(axes[:, 0], busy, strict=True):
        pts = rates[link]
        shaped = info["shaped_mbps"].get(link)
        ax.plot([t for t, _ in pts], [m for _, m in pts], color=COLORS.get(link.split("->")[0]),
                label=f"{link} traffic")
        if shaped:
            ax.axhline(shaped, color="#e53e3e", linestyle="--", linewidth=1,
                       label=f"shaped to {shaped:g} Mbit/s")
        if start is not None:
            for mark, label in (("kill", "cut"), ("heal", "healed")):
                if mark in partition:
                    ax.axvline(start + partition[mark], color="#718096", linestyle=":")
                    ax.annotate(label, (start + partition[mark], 0.95), fontsize=7,
                                xycoords=("data", "axes fraction"), va="top")
        ax.set_ylabel("Mbit/s")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("seconds since the demo started")
    axes[0, 0].set_title("traffic per link (tc class counters) against its shaped rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def burst(facts: dict[str, Any], path: Path) -> Path | None:
    """Autoscaled nodes per site over the burst step, and when each task ran where."""
    b = facts.get("burst") or {}
    timeline = b.get("timeline") or {}
    if not timeline.get("t"):
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True,
                                   gridspec_kw={"height_ratios": [2, 3]})
    for site, counts in sorted(timeline["nodes"].items()):
        ax1.step(timeline["t"], counts, where="post", color=COLORS.get(site), label=site,
                 linewidth=2)
    ax1.axhline(0, color="#a0aec0", linewidth=0.8)
    if b.get("drained_at") and b.get("demand_at"):
        ax1.axvline(b["drained_at"] - b["demand_at"], color="black", linestyle="--",
                    linewidth=1, label="work drained")
    ax1.set_ylabel("autoscaled nodes")
    ax1.set_title(f"burst: {b.get('tasks')} tasks on {b.get('cluster')}; cloud nodes from "
                  "Ray's autoscaler, stopped when idle")
    ax1.legend(loc="upper right")
    ax1.grid(alpha=0.3)
    nodes = sorted({r["node"] for r in b.get("results", [])})
    for r in b.get("results", []):
        y = nodes.index(r["node"])
        ax2.barh(y, r["ended"] - r["started"], left=r["started"] - b["demand_at"], height=0.6,
                 color=COLORS.get(r["site"]), alpha=0.8)
    ax2.set_yticks(range(len(nodes)), nodes)
    ax2.set_xlabel("seconds since the demand")
    ax2.set_title("tasks by node")
    ax2.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
