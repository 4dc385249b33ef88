"""``report.md``: the demo's facts as a page people read, plots inline."""

from __future__ import annotations

from typing import Any


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def render(f: dict[str, Any]) -> str:
    out = [f"# hybridray demo report: `{f['name']}` ({f['mode']})", "",
           f"Started {f['started_at']}, took {f.get('duration_s', 0):.0f} s on this machine. "
           f"Facts as JSON: `report.json`. Audit log: `{f.get('audit_log')}`.", ""]
    if f.get("error"):
        out += [f"**The demo stopped early**: `{f['error']}`. What it did until then is below, "
                "and everything it started was stopped.", ""]
    out += ["## Steps", "", _table(["step", "seconds", "outcome"],
                                   [[s["name"], s.get("seconds"), s.get("outcome")]
                                    for s in f.get("steps", [])]), ""]
    out += ["## Decisions: what ran where, and why", "",
            _table(["t (s)", "outcome", "what", "where", "why"],
                   [[d["t"], d["outcome"], d["what"], ", ".join(d["sites"]) or "—",
                     d["why"].replace("|", "/")] for d in f.get("decisions", [])]), ""]
    rw = f.get("restricted_work") or {}
    if rw:
        out += ["## Restricted data stayed on-prem", "",
                f"Sites where restricted work ran: **{', '.join(rw['sites']) or 'none'}**.", "",
                _table(["restricted work", "ran at"],
                       [[w["what"], ", ".join(w["ran_at"])] for w in rw["work"]]), ""]
    rs = f.get("refused_sync") or {}
    if rs:
        out += [f"Refused sync of raw tickets to {rs.get('destination')}: "
                f"**{'refused' if rs.get('refused') else 'NOT refused'}** "
                f"(rule `{rs.get('rule')}`): {rs.get('message', '')}", ""]
    t = f.get("training") or {}
    if t:
        out += ["## Training", "",
                f"`{t['run']}`: {t['steps']} steps, {t.get('precision')}, workers at "
                f"{', '.join(t['worker_sites'])} (planned {', '.join(t['planned_sites'])}); "
                f"eval loss {t['initial_eval_loss']:.3f} → {t['final_eval_loss']:.3f}; "
                f"{(t.get('tokens_per_s') or 0):,.0f} tokens/s; checkpoint `{t['checkpoint']}`.",
                ""]
        if "training.png" in f.get("plots", []):
            out += ["![training curve](training.png)", ""]
    s = f.get("serving") or {}
    if s:
        out += ["## Serving", ""]
        q = s.get("quality") or {}
        if q:
            out += ["Quantization, measured by each replica against its fp32 original when it "
                    "started:", "",
                    _table(["model@site", "method", "metric", "value", "bound", "int8 layers",
                            "passed"],
                           [[k, v["method"], v["metric"], f"{v['value']:.4f}", v["bound"],
                             f"{v['layers_quantized']}/{v['layers_total']}", v["passed"]]
                            for k, v in q.items() if v]), ""]
        summ = s.get("summary") or {}
        if summ:
            killed = s.get("killed") or {}
            out += [f"{summ['requests']} requests, {summ['ok']} answered, {summ['failed']} "
                    f"failed, {summ['retried']} needed a retry. {killed.get('site')}'s node "
                    f"(pid {killed.get('pid')}) was killed at t={killed.get('at')} s; after "
                    f"it {summ['ok_after_kill']} requests were answered "
                    f"({summ['failed_after_kill']} failed).", "",
                    _table(["", "answered by model@site"],
                           [["before the kill", summ["before_kill"]],
                            ["after the kill", summ["after_kill"]]]), ""]
        lat = s.get("latency") or {}
        if lat:
            out += [_table(["model@site", "requests", "p50 ms", "p95 ms", "p99 ms", "per s"],
                           [[k, v["requests"], v["p50_ms"], v["p95_ms"], v["p99_ms"],
                             v["per_s"]] for k, v in lat.items()]), ""]
        if "serving.png" in f.get("plots", []):
            out += ["![serving latency, throughput and replicas](serving.png)", ""]
    out += _burst(f)
    c = f.get("cost") or {}
    if c:
        out += ["## Cost (topology prices × node-hours, plus egress)", "",
                _table(["site", "$/hour", "node-hours", "compute $", "egress $", "total $"],
                       [[k, v["price_per_hour"], f"{v['node_hours']:.4f}",
                         f"{v['compute']:.5f}", f"{v['egress']:.6f}", f"{v['total']:.5f}"]
                        for k, v in c["by_site"].items()]), "",
                f"Total: **${c['total']:.5f}**.", ""]
        if "cost.png" in f.get("plots", []):
            out += ["![cost by site](cost.png)", ""]
    xb = f.get("cross_site_bytes") or []
    out += ["## Bytes across sites", ""]
    if xb:
        out += [_table(["from", "to", "what", "bytes", "egress $"],
                       [[r["src"], r["dst"], r["what"], _mb(r["bytes"]), f"{r['cost']:.6f}"]
                        for r in xb]), ""]
        if "bytes.png" in f.get("plots", []):
            out += ["![bytes across sites](bytes.png)", ""]
    else:
        out += ["None recorded.", ""]
    lk = f.get("links") or {}
    if lk.get("samples"):
        from hybridray.report.plots import link_rates

        rates = link_rates(f)
        out += ["## Links (namespace hosts)", "",
                "Every node ran as a host of its own; each direction of each declared link was "
                "shaped by a token bucket on its site's uplink. Traffic is what the kernel "
                "counted in that link's class."
                + ("" if lk.get("latency_applied") else " Latency was **not** applied (this "
                   "kernel has no netem qdisc): links carried their bandwidth only."), "",
                _table(["link", "shaped to", "peak 1-s rate", "bytes carried"],
                       [[k, f"{v:g} Mbit/s",
                         f"{max((m for _, m in rates.get(k, [])), default=0):.1f} Mbit/s",
                         _mb(lk["samples"][-1]["bytes"].get(k, 0)
                             - lk["samples"][0]["bytes"].get(k, 0))]
                        for k, v in lk["shaped_mbps"].items()]), ""]
        if "links.png" in f.get("plots", []):
            out += ["![traffic per link against its shaped rate](links.png)", ""]
    a = f.get("audit") or {}
    if a:
        out += ["## Audit summary", "",
                ", ".join(f"{n} {e}" for e, n in sorted(a["events"].items())), "",
                _table(["site", "kind", "outcome", "decisions"],
                       [[d["site"], d["kind"], d["outcome"], d["count"]]
                        for d in a["decisions"]]), ""]
        if a["refusals"]:
            out += ["Refusals:", ""] + [f"- `{r['workload']}` ({r.get('rule')}): "
                                        f"{(r.get('message') or '')[:300]}"
                                        for r in a["refusals"]] + [""]
    p = f.get("processes") or {}
    if p:
        out += ["## Clean-up", "",
                f"{len(p['recorded'])} processes recorded (node leaders, the S3 server, the "
                f"killed node's processes); left after down: **{len(p['left'])}** "
                f"{p['left'] or ''}.", ""]
    if f.get("metrics_file"):
        out += [f"Prometheus metrics scraped before down: `{f['metrics_file']}`.", ""]
    return "\n".join(out)


def _burst(f: dict[str, Any]) -> list[str]:
    b = f.get("burst") or {}
    if not b:
        return []
    out = ["## Burst: cloud nodes from Ray's autoscaler, then none", ""]
    if b.get("error"):
        return out + [f"**The burst step failed**: `{b['error']}`.", ""]
    if "cost" not in b:
        return out + ["The burst step did not get as far as its demand.", ""]
    c = b["cost"]
    first = b.get("first_cloud_task_s")
    out += [f"`{b['file']}` as cluster `{b['cluster']}`: on-prem is static, the cloud pools are "
            f"elastic at `min: 0`. {b['tasks']} confidential `onprem-first` tasks of "
            f"{b['task_s']:g} s arrived at once (policy order: {', '.join(b['sites'])}); "
            "Ray's autoscaler added the cloud nodes their label selectors asked for"
            + (f", and the first task on a new cloud node started {first:.1f} s after the "
               "demand" if first is not None else "")
            + f". All work drained at t={b['drained_at'] - b['demand_at']:.1f} s; after the "
            f"{b['idle_timeout_s']} s idle timeout the cloud was "
            f"{'back to zero nodes' if b.get('reached_zero') else 'NOT back to zero'} "
            f"at t={b['zero_at'] - b['demand_at']:.1f} s.", "",
            _table(["tasks ran at", "count"], [[k, v] for k, v in
                                               sorted(b["tasks_by_site"].items())]), "",
            _table(["node", "up from (s)", "to (s)", "stopped because", "cost $"],
                   [[s["key"], f"{s['start']:.1f}", f"{s['end']:.1f}", s.get("reason") or "-",
                     f"{s['cost']:.6f}"] for s in b.get("spans", [])]), "",
            f"Cloud cost of the burst as it ran: **${c['actual']:.6f}** "
            f"({c['cloud_node_hours']:.4f} node-hours). Holding the same peak ({b['peak']}) up "
            f"for the whole {b['window_s']:.0f} s would have cost ${c['peak_held']:.6f}: "
            f"**{c['saved_pct']:.0f}% saved** (${c['saved']:.6f}); over a day of such bursts "
            "the held capacity would bill all 24 hours.", ""]
    if "burst.png" in f.get("plots", []):
        out += ["![autoscaled nodes per site over time](burst.png)", ""]
    return out
