"""The demo's report: ``report.json`` (the facts, for machines and tests), ``report.md`` and
PNG plots (for people).

    from hybridray.report import write_report
    paths = write_report(facts, "out/")      # {"json": ..., "markdown": ..., "plots": [...]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hybridray.report import facts as F

__all__ = ["write_report"]


def write_report(facts: dict[str, Any], directory: str | os.PathLike, *,
                 home: str | os.PathLike | None = None) -> dict[str, Any]:
    """Complete ``facts`` with what the audit log knows, then write JSON, Markdown and plots.

    Adds ``cross_site_bytes``, ``cost``, ``audit``, ``restricted_work`` and (when there was
    load) ``serving.latency`` to ``facts`` in place.
    """
    from hybridray.audit import AuditLog
    from hybridray.report import markdown, plots

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    records = F.audit_since(list(AuditLog.for_cluster(facts["name"], home)),
                            facts.get("started_ts", 0))
    facts["audit_log"] = str(AuditLog.for_cluster(facts["name"], home).path)
    facts["cross_site_bytes"] = F.cross_site_bytes(records)
    facts["cost"] = F.cost_by_site(facts, facts["cross_site_bytes"])
    facts["audit"] = F.audit_summary(records)
    facts["restricted_work"] = F.restricted_work(facts, records)
    serving = facts.get("serving") or {}
    if (serving.get("load") or {}).get("records"):
        serving["latency"] = F.latency_summary(serving["load"]["records"])
    metrics_text = facts.pop("metrics_text", None)
    if metrics_text:
        (out / "metrics.prom").write_text(metrics_text)
        facts["metrics_file"] = "metrics.prom"
    made = []
    for name, fn in (("training.png", plots.training), ("serving.png", plots.serving),
                     ("cost.png", plots.cost), ("bytes.png", plots.transfers),
                     ("links.png", plots.links), ("burst.png", plots.burst)):
        try:
            if fn(facts, out / name):
                made.append(name)
        except Exception as e:  # a plot must never lose the report
            facts.setdefault("plot_errors", {})[name] = f"{type(e).__name__}: {e}"
    facts["plots"] = made
    json_path = out / "report.json"
    json_path.write_text(json.dumps(facts, indent=1, default=str))
    md_path = out / "report.md"
    md_path.write_text(markdown.render(facts))
    return {"json": json_path, "markdown": md_path, "plots": [out / p for p in made]}
