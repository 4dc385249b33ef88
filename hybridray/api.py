"""The Python API for driver scripts: connect to a cluster, run work under a policy, audit it.

    import hybridray
    cluster = hybridray.connect("local")               # a cluster started by `hybridray up`
    wl = hybridray.Workload(name="etl", cpus=1, data_classes=["restricted"])
    ref = cluster.run(clean, wl, "tickets")            # placed, audited, guarded
    print(ray.get(ref), cluster.audit.read("placement")[-1])

``connect(NAME)`` works the same for a cluster started by ``hybridray up`` and one recorded by
``hybridray attach``: it reads only the cluster record. Inside a Ray job (``ray job submit``)
``connect()`` with no name uses ``$HYBRIDRAY_CLUSTER`` or the only cluster recorded, and
attaches to the Ray instance the job already runs in; on a node without the operator's files
it reads the record's copy in Ray's internal KV (``hybridray.cluster.mirror``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from hybridray.audit import AuditLog
from hybridray.exceptions import ClusterNotFound, HybridRayError
from hybridray.placement import compile as C
from hybridray.placement.capacity import Capacity
from hybridray.placement.decision import Placement
from hybridray.placement.guard import check_residency, guarded
from hybridray.placement.policy import decide
from hybridray.placement.snapshot import CapacitySnapshots
from hybridray.placement.workload import Workload
from hybridray.topology.models import Topology

LASTING_RECHECK_S = 3.0


class Cluster:
    """A topology plus a connected Ray instance plus its audit log."""

    def __init__(self, topology: Topology, *, audit: AuditLog | None = None,
                 state: Any = None):
        self.topology = topology
        self.state = state
        self.audit = audit or AuditLog.for_cluster(topology.name)
        self._snapshots: CapacitySnapshots | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_snapshots": None}   # a thread and a lock stay here

    @property
    def name(self) -> str:
        return self.topology.name

    # -- deciding -----------------------------------------------------------------------
    def members(self) -> set[str] | None:
        """Node ids of the cluster's recorded members, read afresh (an ``admit`` in another
        process counts at once); None when this ``Cluster`` has no record."""
        state = self.state
        if state is None:
            return None
        if state.home:
            from hybridray.cluster.state import load_state

            try:
                state = self.state = load_state(state.name, home=state.home)
            except HybridRayError:
                pass
        return state.member_ids()

    def drift(self, nodes: list | None = None) -> list:
        """Live nodes placement must stay off (``membership.DriftNode``s); [] outside Ray.

        A node of an ``up`` cluster whose Ray restarted under its recorded process (a host's
        service loop after a partition heals) is recognised and recorded as a member.
        """
        import ray

        if not ray.is_initialized():
            return []
        from hybridray.cluster.membership import effective_members, find_drift, record_rejoined

        nodes = ray.nodes() if nodes is None else nodes
        self.members()                                   # read the record afresh
        if self.state is not None and self.state.home:
            record_rejoined(self.state, nodes)
        return find_drift(self.topology, effective_members(self.state, nodes), nodes)

    def capacity(self, live: bool = True, *, max_age_s: float | None = None) -> Capacity:
        """Live capacity from Ray when connected (``live``: what runs, plus the nodes Ray's
        autoscaler may still add to elastic pools), else the topology at full size; either
        way less the drift nodes, which the placement then avoids.

        The nodes and what each has free come from a snapshot of the cluster at most
        ``max_age_s`` old (default ``MAX_AGE_S``, 1 s), normally at most ``REFRESH_S``
        (0.25 s): see ``hybridray.placement.snapshot``; ``max_age_s=0`` reads Ray afresh.
        """
        import ray

        if not ray.is_initialized():
            return Capacity.from_topology(self.topology)
        if self._snapshots is None:
            self._snapshots = CapacitySnapshots()
        snap = self._snapshots.get(max_age_s)
        avoid = {d.node_id: d.why for d in self.drift(snap.nodes)}
        if live:
            return Capacity.from_ray(self.topology, avoid=avoid, nodes=snap.nodes,
                                     free=snap.free)
        return Capacity.from_topology(self.topology, avoid=avoid)

    def place(self, workload: Workload, *, live: bool = True,
              max_age_s: float | None = None) -> Placement:
        """Decide where ``workload`` may run and audit the decision (refusals included).

        Drift nodes are kept out of the decision and out of every selector compiled from
        it; each exclusion is audited (event ``drift``, action ``excluded``).
        ``max_age_s``: how old the live reading may be (``capacity``); the decisions that
        start a training run or a sync read it afresh (0), one per run.
        """
        cap = self.capacity(live, max_age_s=max_age_s)
        placement = decide(self.topology, workload, cap)
        # Refused for what actors and placement groups hold: one that is being released right
        # now (a run that just ended) still looks held for a moment, so look again first.
        deadline = time.monotonic() + LASTING_RECHECK_S
        while (cap is not None and not placement.ok and placement.refusal.rule == "capacity"
               and cap.usage_read and time.monotonic() < deadline):
            time.sleep(0.5)
            cap = self.capacity(live, max_age_s=0)     # look again: not the same snapshot
            placement = decide(self.topology, workload, cap)
        self.audit.placement(placement, cluster=self.name)
        if cap.avoid:
            self.audit.record("drift", cluster=self.name, action="excluded",
                              workload=workload.name,
                              nodes=[{"node_id": k, "reasons": v} for k, v in cap.avoid.items()])
        return placement

    # -- running ------------------------------------------------------------------------
    def remote(self, workload: Workload, fn: Callable | type, *, guard: bool = True):
        """``fn`` (a function, class, or something already ``@ray.remote``) with the
        placement's options applied; raises ``PlacementRefused`` if the policy refuses.

        With ``guard`` (default), functions check the node's labels before running and
        classes before ``__init__`` (``check_residency``): defence in depth behind the label
        selectors. Something already ``@ray.remote`` is unwrapped, guarded and rebuilt with
        its own ``@ray.remote`` options, so it is checked exactly like a plain function.
        Inside the work, ``hybridray.child_options()`` gives children the same placement.
        """
        import ray

        placement = self.place(workload).raise_if_refused()
        opts = C.task_options(placement)
        base, defaults = _unwrap_remote(fn)
        if not guard:
            return (fn if base is not fn else ray.remote(fn)).options(**opts)
        # The placement's class (an undeclared workload has the cluster's default by now).
        data_class = placement.workload.data_class
        target = _guard_class(base, data_class, opts) if isinstance(base, type) else \
            guarded(data_class, opts)(base)
        remote = ray.remote(**defaults)(target) if defaults else ray.remote(target)
        return remote.options(**opts)

    def run(self, fn: Callable, workload: Workload, *args: Any, **kwargs: Any):
        """Place ``fn`` by ``workload`` and start it; returns the ``ObjectRef``."""
        return self.remote(workload, fn).remote(*args, **kwargs)

    def actor(self, cls: type, workload: Workload, *args: Any, **kwargs: Any):
        """Place and start an actor of ``cls``; returns its handle."""
        return self.remote(workload, cls).remote(*args, **kwargs)


def _unwrap_remote(fn: Any) -> tuple[Any, dict[str, Any]]:
    """(the plain function or class, its ``@ray.remote(...)`` options) of ``fn``.

    Something already ``@ray.remote`` is taken apart so the guard can wrap the code itself:
    options applied to the remote object alone would place it but never check the node.
    """
    from ray.actor import ActorClass
    from ray.remote_function import RemoteFunction

    if isinstance(fn, RemoteFunction):
        return fn._function, dict(fn._default_options or {})
    if isinstance(fn, ActorClass):
        return fn.__ray_metadata__.modified_class, dict(fn._default_options or {})
    return fn, {}


def _guard_class(cls: type, data_class: Any, options: dict[str, Any] | None = None) -> type:
    """A subclass of ``cls`` whose ``__init__`` first checks the node may hold the data."""
    from hybridray.placement.guard import enter_parent

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_residency(data_class)
        if options is not None:
            enter_parent(data_class, options)
        cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__})


JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"   # set by Ray in every job's entrypoint


def connect(name: str | None = None, *, home: str | os.PathLike | None = None,
            init_ray: bool = True) -> Cluster:
    """Connect to a recorded cluster (``hybridray up`` or ``hybridray attach``) by name and
    return a ``Cluster``.

    The one connect path of every command and driver: the record's environment (token, TLS,
    address) is applied *and* Ray's cached auth and TLS config are re-read before
    ``ray.init``, so it works whether or not Ray was imported first. Ray is not
    (re-)initialised when it already is (inside a job or task) or ``init_ray`` is false.
    Inside a job on a node that has no record, the record's copy in Ray's KV is used.
    """
    from hybridray import cluster as lifecycle

    if name is None:
        name = os.environ.get("HYBRIDRAY_CLUSTER")
    in_job = JOB_DRIVER_ENV in os.environ
    try:
        if name is None:
            known = lifecycle.list_clusters(home)
            if len(known) != 1:
                raise ClusterNotFound(
                    "say which cluster to connect to: hybridray.connect(NAME) or set "
                    f"HYBRIDRAY_CLUSTER (recorded clusters: {', '.join(known) or 'none'})")
            name = known[0]
        state = lifecycle.load_state(name, home=home)
    except ClusterNotFound:
        if not (in_job and init_ray):
            raise
        return _connect_in_job(name)
    if init_ray:
        import ray

        if not ray.is_initialized():
            where, env = dict(_job_driver_node()), lifecycle.ray_env(state)
            if state.netns:  # a driver runs on a host of the cluster, as on a real one
                from hybridray.cluster.nshosts import driver_host, host_tls

                host = driver_host(state)
                where["_node_ip_address"] = host.ip
                env.update(host_tls(state, host))  # workers dial it: its own certificate
            lifecycle.apply_env(env)  # Ray may have read TLS already
            ray.init(address=state.address, log_to_driver=False, **where)
    topology = state.topology()
    _record_driver_site(topology, state.address, init_ray)
    return Cluster(topology, audit=AuditLog.for_cluster(name, home), state=state)


def _connect_in_job(name: str | None) -> Cluster:
    """Inside a job whose node lacks the operator's files: the record from Ray's KV, and an
    audit log whose records are queued there for the operator's next drain."""
    import ray

    from hybridray.cluster import mirror

    if not ray.is_initialized():       # the job's own cluster (RAY_ADDRESS), at its own node
        ray.init(log_to_driver=False, **_job_driver_node())
    state = mirror.state_from_kv(name)
    if state is None:
        raise ClusterNotFound(
            f"no record of cluster {name or '(unnamed)'!r} on this node nor in the Ray "
            "cluster's KV; submit with hybridray submit --cluster NAME, which sets "
            "HYBRIDRAY_CLUSTER, after hybridray up or attach recorded it")
    from hybridray.topology.models import Topology

    topology = Topology.model_validate(state.topology_snapshot)
    _record_driver_site(topology, state.address, True)
    return Cluster(topology, audit=mirror.QueuedAuditLog(state.name), state=state)


def _on_this_host(address: str) -> bool:
    """Whether ``HOST:PORT`` names this machine (loopback, or an address bound here)."""
    import socket

    from hybridray.storage.fs import is_loopback

    host = address.rsplit(":", 1)[0].strip("[]")
    if is_loopback(f"tcp://{address}"):
        return True
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, 0))  # only an address of one of this host's interfaces binds
        return True
    except OSError:
        return False


def _job_driver_node() -> dict[str, str]:
    """``ray.init`` options that attach a job's entrypoint to the node it runs on.

    A job's entrypoint runs under the job supervisor on the node Ray placed it at; but a
    plain ``ray.init`` attaches to the *head* when several nodes share a host (one machine,
    or several sites' nodes on one VM), so the driver would see the head's labels. The
    raylet above the entrypoint (its process ancestry: supervisor worker, then raylet) names
    its node exactly by its ``--temp_dir``. Outside a job: nothing.
    """
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return {}
    pid = os.getppid()
    for _ in range(8):
        args = _cmdline(pid)
        if args and os.path.basename(args[0]) == "raylet":
            temp = next((a.split("=", 1)[1] for a in args if a.startswith("--temp_dir=")),
                        None)
            return {"_temp_dir": temp} if temp else {}
        pid = _parent(pid)
        if pid <= 1:
            break
    return {}


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _record_driver_site(topology: Topology, address: str, connected: bool = False) -> None:
    """Tell the guard where this driver runs, and say so on stdout in a job.

    A job's entrypoint (attached to its own node by ``_job_driver_node``): that node's
    labels. Otherwise ``$HYBRIDRAY_SITE`` (the operator's word for this machine), else the
    head's site when the cluster's address is on this machine; else unknown (reads refused).
    """
    from hybridray import labels as L
    from hybridray.placement.guard import set_driver_site

    site = None
    if connected and _job_driver_node():
        import ray

        site = (ray.get_runtime_context().get_node_labels() or {}).get(L.SITE)
        if site:  # visible in `hybridray submit` and `ray job logs`
            print(f"hybridray: job driver running at site {site} (node "
                  f"{ray.get_runtime_context().get_node_id()[:12]})", flush=True)
    site = site or os.environ.get("HYBRIDRAY_SITE")
    if site is None and _on_this_host(address):
        site = topology.head.site
    if site is not None and site not in topology.sites:
        raise ClusterNotFound(f"HYBRIDRAY_SITE={site!r} is not a site of cluster "
                              f"{topology.name!r}; set it to one of {', '.join(topology.sites)}")
    set_driver_site(site, topology.sites[site].max_data_class if site else None,
                    topology.name)
