"""Append-only audit log: every placement decision, refusal and cross-site byte, as JSON lines.

One file per cluster under ``$HYBRIDRAY_HOME/audit/NAME.jsonl``, outside the cluster's state
directory so it survives ``hybridray down``. Each record is written with a single ``write`` on
an ``O_APPEND`` descriptor under an exclusive ``flock``, so concurrent writers (drivers, jobs,
the CLI) never interleave or overwrite lines. Nothing in hybridray rewrites or truncates it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hybridray.home import hybridray_home  # noqa: F401  (re-exported)
from hybridray.placement.decision import Placement


def audit_path(cluster: str, home: str | os.PathLike | None = None) -> Path:
    return hybridray_home(home) / "audit" / f"{cluster}.jsonl"


class AuditLog:
    """Append records to, and read them back from, one cluster's audit file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def for_cluster(cls, cluster: str, home: str | os.PathLike | None = None) -> AuditLog:
        return cls(audit_path(cluster, home))

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record (``ts``, ``event``, ``pid`` plus ``fields``) and return it."""
        rec = {"ts": round(time.time(), 6), "event": event, "pid": os.getpid(), **fields}
        line = (json.dumps(rec, default=str, separators=(",", ":")) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return rec

    def placement(self, placement: Placement, **extra: Any) -> dict[str, Any]:
        """Record a placement decision (or refusal)."""
        event = "placement" if placement.ok else "refusal"
        return self.record(event, **placement.summary(), **extra)

    def refusal(self, error: Exception, *, what: str, **fields: Any) -> dict[str, Any]:
        """Record a refusal raised outside ``place`` (a dataset read, a checkpoint site, a
        guard violation in a worker): the rule, message and fix of a ``PlacementRefused``."""
        rec = {"what": what, "outcome": "refused",
               "rule": getattr(error, "rule", type(error).__name__),
               "message": getattr(error, "message", str(error)),
               "fix": getattr(error, "fix", "")}
        rec.update(fields)
        return self.record("refusal", **rec)

    def transfer(self, src_site: str, dst_site: str, nbytes: int, cost: float = 0.0,
                 **extra: Any) -> dict[str, Any]:
        """Record bytes sent from one site to another and what the link charged for them."""
        return self.record("transfer", src=src_site, dst=dst_site, bytes=int(nbytes),
                           cost=round(cost, 6), **extra)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield json.loads(line)

    def read(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """All records, optionally only those of ``event`` whose fields equal ``match``."""
        return [r for r in self
                if (event is None or r.get("event") == event)
                and all(r.get(k) == v for k, v in match.items())]
