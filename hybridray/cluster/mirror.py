"""What hybridray keeps inside the Ray cluster itself, in Ray's internal KV store.

The cluster record lives on the operator's disk, but code running *in* the cluster needs part
of it: a worker's guard must know which nodes are members, and a job driver that Ray started
on a remote node (``hybridray submit``) must find the topology without the operator's files.
So whoever writes the record (``up``, ``attach``, ``admit``) also publishes a copy of the
non-secret part into the KV (namespace ``hybridray``, key ``cluster/NAME``): topology,
members, origin. Nothing secret goes there: no token, no key, no path on the operator's disk.

The other direction: audit records made inside the cluster (a guard refusing a drift node,
a job driver's placements) are queued under ``event/…`` and drained into the operator's
audit log by the next ``hybridray status``/``audit`` that reaches the GCS.

The KV is writable by anyone holding the cluster token, so it is a convenience for workers,
never the authority: decisions on the operator's side read the record on disk.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any

from hybridray.audit import AuditLog
from hybridray.cluster.state import ClusterState
from hybridray.topology.models import Topology

NAMESPACE = b"hybridray"
RECORD_PREFIX = "cluster/"
EVENT_PREFIX = "event/"
MAX_DRAIN = 1000


def record_doc(state: ClusterState, topology: Topology | None = None) -> dict[str, Any]:
    """The part of the record workers and remote job drivers may see."""
    topo = topology.model_dump(mode="json") if topology is not None else \
        state.topology_snapshot
    return {"name": state.name, "origin": state.origin, "address": state.address,
            "topology": topo, "updated_at": time.time(),
            "members": {m.node_id: {"site": m.site, "key": m.key, "how": m.how}
                        for m in state.members}}


def publish(view: Any, state: ClusterState, topology: Topology | None = None) -> None:
    """Write ``state``'s public part into the KV through a ``GcsView``."""
    view.kv_put(f"{RECORD_PREFIX}{state.name}", json.dumps(record_doc(state, topology)))


# ---- inside Ray (a worker, or a driver connected with ray.init) ----------------------------

def _kv():
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return None
    return internal_kv


def read_records() -> dict[str, dict[str, Any]]:
    """Every hybridray record mirrored into the Ray cluster this process is connected to."""
    kv = _kv()
    if kv is None:
        return {}
    out = {}
    for key in kv._internal_kv_list(RECORD_PREFIX, namespace=NAMESPACE) or []:
        raw = kv._internal_kv_get(key, namespace=NAMESPACE)
        if raw:
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            out[key.decode()[len(RECORD_PREFIX):]] = doc
    return out


def state_from_kv(name: str | None) -> ClusterState | None:
    """A ``ClusterState`` rebuilt from the KV mirror (inside a job on a node without the
    operator's files), or None when no such record is mirrored. ``name`` None takes the only
    one."""
    from hybridray.cluster.state import Member

    records = read_records()
    if name is None:
        if len(records) != 1:
            return None
        name = next(iter(records))
    doc = records.get(name)
    if doc is None:
        return None
    members = [Member(node_id=k, site=v.get("site", ""), key=v.get("key"),
                      how=v.get("how", "up")) for k, v in doc.get("members", {}).items()]
    return ClusterState(name=name, address=doc.get("address", ""), token_path="", temp_dir="",
                        home="", origin=doc.get("origin", "attach"),
                        topology_snapshot=doc["topology"], members=members)


def queue_event(event: str, **fields: Any) -> None:
    """Queue an audit record made inside the cluster; never raises (auditing must not turn
    a refusal into a different error)."""
    try:
        kv = _kv()
        if kv is None:
            return
        rec = {"ts": round(time.time(), 6), "event": event, "pid": os.getpid(), **fields}
        key = f"{EVENT_PREFIX}{time.time_ns():020d}-{secrets.token_hex(4)}"
        kv._internal_kv_put(key, json.dumps(rec, default=str), namespace=NAMESPACE)
    except Exception:
        pass


class QueuedAuditLog(AuditLog):
    """An audit log for code running inside the cluster without the operator's files: each
    record is queued in the KV for the operator's next drain."""

    def __init__(self, cluster: str):
        super().__init__(os.devnull)
        self.cluster = cluster

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        fields.setdefault("cluster", self.cluster)
        queue_event(event, **fields)
        return {"event": event, **fields}

    def __iter__(self):
        return iter(())


# ---- on the operator's side --------------------------------------------------------------

def drain_events(view: Any, audit: AuditLog, name: str) -> int:
    """Move queued in-cluster records into ``audit`` (oldest first); returns how many.

    A record is deleted from the KV only after it was appended, so a crash in between
    repeats a record rather than losing it.
    """
    keys = sorted(view.kv_keys(EVENT_PREFIX))[:MAX_DRAIN]
    moved = 0
    seen: set[str] | None = None     # rids already in ``audit`` (read once, when needed)
    for key in keys:
        raw = view.kv_get(key)
        if raw is not None:
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = {"event": "unreadable", "raw": raw[:200].decode(errors="replace")}
            if rec.get("rid") and seen is None:
                seen = {r["rid"] for r in audit if r.get("rid")}
            if not (rec.get("rid") and rec["rid"] in seen):   # written here by the worker
                event = rec.pop("event", "event")
                rec.pop("ts", None)
                rec.setdefault("cluster", name)
                audit.record(event, **rec, queued=True)
                moved += 1
        view.kv_del(key)
    return moved


def drain(state: ClusterState, *, timeout: float = 2.0) -> int:
    """Best effort: drain ``state``'s queued records into its audit log, if the GCS answers
    (a quick TCP check first, so a cluster that is down costs no GCS client time-out)."""
    from hybridray.cluster.gcs import GcsView, reachable

    if not state.address or not reachable(state.address, timeout):
        return 0
    try:
        with GcsView(state.address, state.token_path, state.tls) as view:
            return drain_events(view, AuditLog.for_cluster(state.name, state.home), state.name)
    except Exception:
        return 0
