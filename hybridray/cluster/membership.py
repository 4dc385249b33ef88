"""Which Ray nodes belong to a cluster, and what every other live node is: drift.

Ray node labels are self-asserted: any machine that holds the cluster token can join with
``--labels hybridray.io/site=onprem,hybridray.io/max-data-class=restricted`` and would match
every on-prem selector. The one label a node cannot choose is Ray's own ``ray.io/node-id``
(Ray 2.60's raylet refuses to start when ``--labels`` sets it). So the cluster record lists its
**members** by node id: the nodes ``hybridray up`` started, the nodes an operator vouched for
at ``hybridray attach``, and nodes admitted since (``admit_nodes``: ``hybridray admit``, or the
autoscaler path). Every other live node is **drift**, and so is a member whose labels claim
more than its site may hold. Drift never receives placed work:

1. **Decisions** (``Cluster.place``/``Cluster.capacity``): drift offers no capacity, and every
   selector the compiler writes excludes it (``ray.io/node-id: !in(...)``, primary and each
   fallback alike, since Ray's fallbacks replace the primary selector rather than add to
   it). This excludes drift rather than allowing members, so a node Ray's autoscaler
   launches later can still satisfy a selector.
2. **In the worker** (``check_member``, called by ``placement.guard.check_residency``): a node
   missing from the membership mirrored into Ray's internal KV refuses to touch data (rule
   ``drift``); the refusal is queued in the KV and drained into the audit log.
3. **Reports**: ``attach``, ``admit`` and ``status`` list drift with the reasons.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hybridray import labels as L
from hybridray.cluster.plan import NODE
from hybridray.cluster.state import ClusterState, Member, now_iso
from hybridray.exceptions import ClusterError, NodeNotMember
from hybridray.topology.models import DataClass, Topology

NODE_ID = "ray.io/node-id"   # set by Ray itself from the node's id; a node cannot choose it


@dataclass
class LiveNode:
    """One node as seen by the GCS or ``ray.nodes()``."""

    node_id: str
    labels: dict[str, str]
    alive: bool = True
    temp_dir: str = ""        # the node's Ray --temp-dir (which process started it)

    @property
    def site(self) -> str | None:
        return self.labels.get(L.SITE)

    @property
    def key(self) -> str | None:
        return self.labels.get(NODE)


@dataclass
class DriftNode:
    """A live node placement must avoid, and why."""

    node_id: str
    site: str | None
    key: str | None
    reasons: list[str] = field(default_factory=list)

    @property
    def why(self) -> str:
        return "; ".join(self.reasons)

    def to_json(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "site": self.site, "key": self.key,
                "reasons": list(self.reasons)}


def live_nodes(nodes: Iterable[Any]) -> list[LiveNode]:
    """``LiveNode``s from ``GcsNode``s, ``ray.nodes()`` dicts or ``LiveNode``s."""
    out = []
    for n in nodes:
        if isinstance(n, LiveNode):
            out.append(n)
        elif isinstance(n, dict):   # ray.nodes(): the temp dir is the socket's prefix
            socket_path = n.get("ObjectStoreSocketName") or ""
            temp = socket_path.split("/session_", 1)[0] if "/session_" in socket_path else ""
            out.append(LiveNode(n["NodeID"], dict(n.get("Labels") or {}), bool(n.get("Alive")),
                                temp))
        else:
            out.append(LiveNode(n.node_id, dict(n.labels), bool(n.alive),
                                getattr(n, "temp_dir", "") or ""))
    return out


def label_problems(topology: Topology, labels: dict[str, str]) -> list[str]:
    """What is wrong with a node's labels for ``topology``; empty when they fit.

    A node may claim less than its site allows (a lower ``max-data-class``) but never more:
    an unknown site or pool, a class above the site's, another site kind, an on-demand
    market for a spot pool, or an accelerator its pool does not have.
    """
    site_name = labels.get(L.SITE)
    if site_name is None:
        return [f"no {L.SITE} label"]
    site = topology.sites.get(site_name)
    if site is None:
        return [f"site {site_name!r} is not in the topology (sites: "
                f"{', '.join(topology.sites)})"]
    problems = []
    claimed = labels.get(L.MAX_DATA_CLASS)
    if claimed is None:
        problems.append(f"no {L.MAX_DATA_CLASS} label")
    else:
        try:
            if DataClass(claimed) > site.max_data_class:
                problems.append(f"claims {L.MAX_DATA_CLASS}={claimed}, above site "
                                f"{site_name}'s {site.max_data_class.value}")
        except ValueError:
            problems.append(f"{L.MAX_DATA_CLASS}={claimed!r} is not a data class")
    kind = labels.get(L.SITE_KIND)
    if kind is not None and kind != site.kind.value:
        problems.append(f"claims {L.SITE_KIND}={kind}, site {site_name} is "
                        f"{site.kind.value}")
    zone = labels.get(L.ZONE)
    if zone is not None and zone != site_name:
        problems.append(f"claims {L.ZONE}={zone}, which hybridray maps to site {zone!r}")
    pool_name = labels.get(L.POOL)
    if pool_name is not None:
        pool = next((p for p in site.pools if p.name == pool_name), None)
        if pool is None:
            problems.append(f"pool {pool_name!r} is not a pool of site {site_name} (pools: "
                            f"{', '.join(p.name for p in site.pools) or 'none'})")
        else:
            market = labels.get(L.MARKET_TYPE)
            if market == "on-demand" and pool.spot:
                problems.append(f"claims {L.MARKET_TYPE}=on-demand, pool {pool_name} is spot")
            accel = labels.get(L.ACCELERATOR)
            if accel is not None and accel != pool.accelerator:
                problems.append(f"claims {L.ACCELERATOR}={accel}, pool {pool_name} has "
                                f"{pool.accelerator or 'none'}")
    return problems


def find_drift(topology: Topology, members: set[str] | None,
               nodes: Iterable[Any]) -> list[DriftNode]:
    """Live nodes placement must avoid: not members (when ``members`` is known) or labelled
    beyond what the topology allows their site."""
    out = []
    for node in live_nodes(nodes):
        if not node.alive:
            continue
        reasons = label_problems(topology, node.labels)
        if members is not None and node.node_id not in members:
            reasons.insert(0, "not a recorded member (joined without hybridray up, attach or "
                              "admit)")
        if reasons:
            out.append(DriftNode(node.node_id, node.site, node.key, reasons))
    return out


def rejoined(state: ClusterState, nodes: Iterable[Any]) -> list[LiveNode]:
    """Live non-members that are a process ``up`` started and still runs: a node whose Ray
    restarted under the same recorded process (a host's service loop after a partition
    heals) comes back with a new node id. It counts as a member when its ``hybridray.io/node``
    key, its Ray temp dir and a live recorded process all match; nothing else does."""
    if state.attached or not state.nodes:
        return []
    members = state.member_ids()
    records = {r.key: r for r in state.nodes if r.temp_dir}
    out = []
    for node in live_nodes(nodes):
        rec = records.get(node.key or "")
        if (node.alive and node.node_id not in members and rec is not None
                and node.temp_dir.rstrip("/") == rec.temp_dir.rstrip("/") and rec.alive()):
            out.append(node)
    return out


def effective_members(state: ClusterState | None, nodes: Iterable[Any]) -> set[str] | None:
    """The record's members plus the nodes ``rejoined`` recognises; None without a record."""
    if state is None:
        return None
    return state.member_ids() | {n.node_id for n in rejoined(state, nodes)}


def record_rejoined(state: ClusterState, nodes: Iterable[Any]) -> list[LiveNode]:
    """Make ``rejoined`` nodes members in the record and the KV (best effort: skipped when
    another process holds the cluster's lock; the next caller records them)."""
    back = rejoined(state, nodes)
    if back:
        try:
            add_members(state.name, [member_for(n, "rejoin") for n in back],
                        home=state.home or None, wait=False)
        except ClusterError:
            pass
    return back


def member_for(node: LiveNode, how: str) -> Member:
    return Member(node_id=node.node_id, site=node.site or "", key=node.key,
                  pool=node.labels.get(L.POOL), admitted_at=now_iso(), how=how)


@dataclass
class Admission:
    """What ``admit_nodes`` did."""

    admitted: list[Member] = field(default_factory=list)
    refused: list[DriftNode] = field(default_factory=list)   # asked for, labels do not fit
    pruned: list[Member] = field(default_factory=list)       # members the GCS reports dead
    drift: list[DriftNode] = field(default_factory=list)     # still drift afterwards


def resolve_ids(wanted: Iterable[str], nodes: list[LiveNode]) -> list[str]:
    """Full node ids for ids or unique prefixes (at least 6 hex digits) of live nodes."""
    out = []
    for want in wanted:
        want = want.strip().lower()
        hits = [n.node_id for n in nodes if n.node_id.startswith(want)] if len(want) >= 6 \
            else []
        if len(hits) != 1:
            what = "matches no live node" if not hits else "matches several nodes"
            raise ClusterError(f"node id {want!r} {what}; give the id (or its first 12 "
                               "digits) as hybridray status NAME lists it")
        out.append(hits[0])
    return out


def admit(state: ClusterState, topology: Topology, nodes: Iterable[Any], *,
          node_ids: Iterable[str] | None = None, how: str = "admit",
          first: bool = False) -> Admission:
    """Add live nodes to ``state.members`` (in memory) and prune members that died.

    ``node_ids`` None admits every live non-member whose labels fit the topology; otherwise
    only those (a node whose labels do not fit is refused, never admitted). ``first``: the
    record is taking its members for the first time (``attach``, ``up --hosts netns``), so
    its started nodes are not carried over as members unchecked, as they are for a record
    written before membership existed.
    """
    seen = live_nodes(nodes)
    by_id = {n.node_id: n for n in seen}
    if not first and not state.members and state.nodes:   # from before membership existed
        state.members = [Member(n.node_id, n.site, n.key, n.pool, state.created_at, "up")
                         for n in state.nodes if n.node_id]
    result = Admission()
    alive = {n.node_id for n in seen if n.alive}
    result.pruned = [m for m in state.members if m.node_id in by_id and
                     m.node_id not in alive]
    state.members = [m for m in state.members if m not in result.pruned]
    current = {m.node_id for m in state.members}
    wanted = [n.node_id for n in seen if n.alive and n.node_id not in current] \
        if node_ids is None else resolve_ids(node_ids, [n for n in seen if n.alive])
    for node_id in wanted:
        node = by_id[node_id]
        if node_id in current:
            continue
        problems = label_problems(topology, node.labels)
        if problems:
            result.refused.append(DriftNode(node_id, node.site, node.key, problems))
            continue
        member = member_for(node, how)
        state.members.append(member)
        current.add(node_id)
        result.admitted.append(member)
    result.drift = find_drift(topology, current, seen)
    return result


def admit_nodes(name: str, node_ids: Iterable[str] | None = None, *, how: str = "admit",
                home: str | os.PathLike | None = None) -> Admission:
    """Admit live nodes into cluster ``name``'s membership: the one way nodes become members
    after ``up``/``attach``.

    Reads the nodes from the GCS, admits ``node_ids`` (ids or unique prefixes; None: every
    live non-member whose labels fit the topology), drops members the GCS reports dead,
    saves the record, mirrors it into Ray's internal KV for the workers' guard and audits
    each admission and refusal. ``how`` is recorded with each member (``admit``,
    ``autoscaler``, ...).

    Raises:
        ClusterNotFound: no record of that name.
        ClusterError: the GCS cannot be reached, or an id matches no live node.
    """
    from hybridray.audit import AuditLog
    from hybridray.cluster import mirror
    from hybridray.cluster.gcs import GcsView
    from hybridray.cluster.state import cluster_lock, load_state, save_state

    with cluster_lock(name, home, wait=True):
        state = load_state(name, home=home)
        topology = state.topology()
        try:
            with GcsView(state.address, state.token_path, state.tls) as view:
                nodes = view.nodes(timeout=10)
                result = admit(state, topology, nodes, node_ids=node_ids, how=how)
                save_state(state)
                mirror.publish(view, state, topology)
        except ClusterError:
            raise
        except Exception as e:
            raise ClusterError(f"cannot read the nodes of cluster {name!r} at {state.address} "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                               f"); check that it runs: hybridray status {name}") from None
    audit = AuditLog.for_cluster(name, state.home)
    for m in result.admitted:
        audit.record("admit", cluster=name, node_id=m.node_id, site=m.site, key=m.key, how=how)
    for d in result.refused:
        audit.record("drift", cluster=name, action="not-admitted", nodes=[d.to_json()])
    return result


def add_members(name: str, members: Iterable[Member], *, remove: Iterable[str] = (),
                home: str | os.PathLike | None = None, wait: bool = True) -> ClusterState:
    """Record ``members`` (and drop the node ids in ``remove``) without reading the GCS:
    for a launcher that knows a node's id before the node registers, e.g. the provider
    behind Ray's autoscaler, so work never reaches the node before it is a member.

    The caller vouches for the node's labels (it started the node with them); ``admit_nodes``
    is the checked way for nodes someone else started. Saves the record and mirrors it into
    the KV (best effort when the GCS cannot be reached: the next ``admit_nodes`` or
    ``add_members`` mirrors it again). ``wait`` False: raise ``ClusterError`` at once when
    another process holds the cluster's lock.
    """
    from hybridray.cluster import mirror
    from hybridray.cluster.gcs import GcsView, reachable
    from hybridray.cluster.state import cluster_lock, load_state, save_state

    with cluster_lock(name, home, wait=wait):
        state = load_state(name, home=home)
        if not state.members and state.nodes:
            state.members = [Member(n.node_id, n.site, n.key, n.pool, state.created_at, "up")
                             for n in state.nodes if n.node_id]
        gone = set(remove)
        known = {m.node_id for m in state.members}
        state.members = [m for m in state.members if m.node_id not in gone]
        for m in members:
            if m.node_id not in known and m.node_id not in gone:
                m.admitted_at = m.admitted_at or now_iso()
                state.members.append(m)
                known.add(m.node_id)
        save_state(state)
        if reachable(state.address, 2.0):
            try:
                with GcsView(state.address, state.token_path, state.tls) as view:
                    mirror.publish(view, state)
            except Exception:
                pass
    return state


# ---- in the worker: the guard's membership check -------------------------------------------

_CACHE_S = 5.0
_cache: tuple[float, dict[str, set[str]]] | None = None


def _kv_members() -> dict[str, set[str]]:
    """Cluster name -> member node ids, from every record mirrored into this Ray cluster."""
    global _cache
    if _cache is not None and time.monotonic() - _cache[0] < _CACHE_S:
        return _cache[1]
    from hybridray.cluster import mirror

    out = {name: set(doc.get("members", {})) for name, doc in mirror.read_records().items()}
    _cache = (time.monotonic(), out)
    return out


def check_member(node_labels: dict[str, str] | None = None) -> None:
    """Raise ``NodeNotMember`` (rule ``drift``) when the node this code runs on is not a
    member of any hybridray cluster recorded in this Ray cluster's KV.

    Nothing is checked outside Ray, or when no hybridray record is mirrored into the
    cluster (plain Ray). A refusal is queued for the audit log (``mirror.queue_event``).
    """
    global _cache
    try:
        import ray
    except ImportError:
        return
    if not ray.is_initialized():
        return
    node_id = ray.get_runtime_context().get_node_id()
    records = _kv_members()
    if not records or any(node_id in ids for ids in records.values()):
        return
    _cache = None                     # admitted since? read afresh next time
    records = _kv_members()
    if not records or any(node_id in ids for ids in records.values()):
        return
    from hybridray.cluster import mirror

    labels = node_labels if node_labels is not None else \
        dict(ray.get_runtime_context().get_node_labels() or {})
    names = sorted(records)
    site = labels.get(L.SITE, "<unlabelled>")
    mirror.queue_event("drift", action="refused-in-worker", clusters=names,
                       nodes=[{"node_id": node_id, "site": labels.get(L.SITE),
                               "key": labels.get(NODE),
                               "reasons": ["not a recorded member"]}])
    raise NodeNotMember(
        f"node {node_id[:12]} (labelled site {site}) is not a recorded member of cluster "
        f"{', '.join(names)}: drift, so it may not run placed work",
        fix=f"if the node belongs, admit it: hybridray admit {names[0]} {node_id[:12]}; "
            "otherwise remove it from the cluster")
