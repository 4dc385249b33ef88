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


# ---- reading it as a person ------------------------------------------------------------------

def local_time(ts: float) -> str:
    """``2026-12-03 10:14:24`` in this machine's local time zone."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def human_bytes(n: float | None) -> str:
    """Bytes in binary units, the way ``hybridray sync`` prints them (``27.7 KiB``)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} TiB"


def describe(rec: dict[str, Any]) -> str:
    """One line per record with the fields that matter for its event, in local time.

    ``placement``: workload (kind, units × shape, class) → sites; ``refusal``: the rule, the
    message and the fix; ``transfer``: src → dst, bytes, egress cost, what moved; ``sync``:
    outcome, source → destination, version, bytes moved, cost; ``train-start``/``train-end``:
    run, sites, steps, checkpoint. Other events show their fields as ``key=value``.
    """
    event = rec.get("event", "?")
    head = f"{local_time(rec.get('ts', 0))}  {event:<11}"
    body = _DESCRIBE.get(event, _fields)(rec)
    return f"{head} {body}".rstrip()


def _shape(rec: dict[str, Any]) -> str:
    unit = f"{rec.get('cpus', 0):g} CPU" + (f" + {rec['gpus']:g} GPU" if rec.get("gpus")
                                             else "")
    count = rec.get("count", 1)
    return (f"{rec.get('kind', '?')}, {count} × {unit}" if count != 1
            else f"{rec.get('kind', '?')}, {unit}")


def _placement(rec: dict[str, Any]) -> str:
    sites = " → ".join(rec.get("sites") or []) or "?"
    first = (rec.get("sites") or [None])[0]
    why = (rec.get("reasons") or {}).get(first, "")
    return (f"{rec.get('workload', '?')} ({_shape(rec)}, {rec.get('data_class', '?')}) at "
            f"{sites}" + (f"  [{why}]" if why else ""))


def _refusal(rec: dict[str, Any]) -> str:
    return (f"{rec.get('workload', '?')} ({_shape(rec)}, {rec.get('data_class', '?')}) "
            f"REFUSED by {rec.get('rule', '?')}: {rec.get('message', '')}  Fix: "
            f"{rec.get('fix', '')}")


def _transfer(rec: dict[str, Any]) -> str:
    what = rec.get("what") or ("sync " + rec["sync_id"][:8] if rec.get("sync_id") else "")
    of = rec.get("run") or rec.get("service") or rec.get("destination") or ""
    tail = ", ".join(x for x in (what, of and f"for {of}") if x)
    return (f"{rec.get('src', '?')} → {rec.get('dst', '?')}  {human_bytes(rec.get('bytes'))}"
            f"  ${rec.get('cost', 0):.4f}" + (f"  ({tail})" if tail else ""))


def _sync(rec: dict[str, Any]) -> str:
    outcome = rec.get("outcome", "?")
    text = f"{outcome} {rec.get('source', '?')} → {rec.get('destination', '?')}"
    if outcome in ("committed", "up-to-date"):
        text += (f" v{rec.get('version')}, {human_bytes(rec.get('bytes_moved'))} moved, "
                 f"${rec.get('cost', 0):.4f}, {rec.get('data_class', '?')}"
                 + (" (masked)" if rec.get("masked") else ""))
    elif outcome == "refused":
        text += f": {rec.get('rule', '?')}"
    elif rec.get("error"):
        text += f": {str(rec['error']).splitlines()[0][:200]}"
    return text


def _train_start(rec: dict[str, Any]) -> str:
    text = (f"{rec.get('run', '?')} ({rec.get('data_class', '?')}) workers at "
            f"{', '.join(rec.get('sites') or []) or '?'}, wan {rec.get('wan', '?')}")
    if rec.get("resume_step"):
        text += f", resuming from step {rec['resume_step']}"
    return text


def _train_end(rec: dict[str, Any]) -> str:
    loss = rec.get("final_eval_loss")
    return (f"{rec.get('run', '?')}: {rec.get('steps', '?')} steps on "
            f"{', '.join(rec.get('worker_sites') or []) or '?'}, checkpoint "
            f"{rec.get('checkpoint') or '-'}"
            + (f", eval loss {loss:.3f}" if isinstance(loss, (int, float)) else "")
            + (f", {rec['restarts']} restart(s)" if rec.get("restarts") else ""))


def _verify(rec: dict[str, Any]) -> str:
    problems = rec.get("problems") or []
    return (f"{rec.get('address', '?')} v{rec.get('version', '?')}: {rec.get('parts', '?')} "
            f"part(s) " + ("OK" if rec.get("ok") else f"{len(problems)} problem(s)"
                                                     + (f", first: {problems[0]}" if problems
                                                        else "")))


def _fields(rec: dict[str, Any]) -> str:
    skip = {"ts", "event", "pid", "cluster"}
    return " ".join(f"{k}={json.dumps(v, default=str) if not isinstance(v, str) else v}"
                    for k, v in rec.items() if k not in skip)[:400]


_DESCRIBE = {"placement": _placement, "refusal": _refusal, "transfer": _transfer,
             "sync": _sync, "train-start": _train_start, "train-end": _train_end,
             "verify": _verify}
