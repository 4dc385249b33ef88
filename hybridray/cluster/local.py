"""Start and stop a real multi-site Ray cluster on this machine: one ``ray start`` per node.

``up`` plans the nodes (``plan.py``), prepares the cluster's directories, token and ports,
and hands the launching to ``startup.py``; if anything fails, it stops whatever was started,
so nothing is left half up. ``down`` stops exactly the recorded processes, recognised by pid
*and* start time: workers first, then the head, SIGKILL for what outlives a grace period.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import time
from pathlib import Path

from hybridray.audit import AuditLog
from hybridray.cluster import elastic
from hybridray.cluster.auth import write_token
from hybridray.cluster.plan import NodeSpec, plan_nodes
from hybridray.cluster.ports import check_pinned, free_ports
from hybridray.cluster.roots import check_storage_is_own, claim_storage
from hybridray.cluster.startup import MAX_ATTEMPTS, Progress, Startup
from hybridray.cluster.state import (
    ClusterState,
    Member,
    NodeRecord,
    cluster_dir,
    cluster_lock,
    descendants,
    hybridray_home,
    load_state,
    now_iso,
    process_start_time,
    processes_using,
    reap,
    save_state,
)
from hybridray.exceptions import ClusterError, ClusterNotFound
from hybridray.storage import emulator
from hybridray.topology.models import Topology

UP_TIMEOUT_S = 60.0
ELASTIC_DIRS = 1_000_000  # ROOT/e99999: as long as a temp dir of the millionth node
STOP_TIMEOUT_S = 15.0
# down waits this long for the cluster's lock: the provider of an elastic pool holds it for
# the seconds it takes to record a node Ray's autoscaler launched or stopped
LOCK_GRACE_S = 30.0
# Unix socket paths hold at most 107 bytes and Ray puts its sockets at
# TEMP_DIR/session_YYYY-MM-DD_HH-MM-SS_UUUUUU_PID/sockets/plasma_store (pid up to 7 digits).
MAX_SOCKET_PATH = 107
SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store.99")


def up(topology: Topology, *, source_file: str | os.PathLike | None = None,
       overrides: list[str] | tuple[str, ...] = (), simulate: bool = False,
       dashboard: bool = True, home: str | os.PathLike | None = None,
       port: int | None = None, dashboard_port: int | None = None,
       timeout: float = UP_TIMEOUT_S, progress: Progress | None = None,
       tls: bool | dict[str, str] = False, hosts: str = "local") -> ClusterState:
    """Start ``topology`` as a real Ray cluster of local processes and record it.

    Args:
        topology: the validated cluster; every site must be ``provider: local`` unless
            ``simulate``.
        source_file: the cluster file it came from, recorded so ``ClusterState.topology()``
            and ``hybridray down FILE`` can reload it.
        overrides: the ``key=value`` overrides applied to ``source_file``.
        simulate: run every site as local processes, one small node per pool.
        dashboard: start the Ray dashboard (needed by ``ray job submit``) on 127.0.0.1.
        home: the hybridray home (default ``$HYBRIDRAY_HOME`` or ``~/.hybridray``).
        port, dashboard_port: pin the GCS or dashboard port instead of picking free ones.
        timeout: seconds each node may take, from its launch, to register with the GCS.
        progress: called with one line per node as it comes up.
        tls: run Ray's gRPC TLS: ``True`` makes a cluster CA and a certificate for this
            machine in the state directory; a dict gives ``RAY_TLS_SERVER_CERT``,
            ``RAY_TLS_SERVER_KEY`` and ``RAY_TLS_CA_CERT`` from ``hybridray certs``, checked
            (key matches certificate, certificate signed by the CA) before anything starts.
        hosts: ``"local"`` (every node a process on this machine's addresses) or
            ``"netns"``: every node a host of its own in a network namespace, sites joined by
            shaped links, started by the rendered join scripts with token auth and mutual
            TLS (``nshosts.py``; needs root). ``port``, ``dashboard_port`` and ``tls`` do not
            apply there: hosts use the rendered ports and always run TLS.

    Returns:
        The recorded state, every node alive and registered.

    Raises:
        ClusterError: a site is not local, a pinned port is taken, the cluster is already
            up, another cluster uses its storage (``hybridray.cluster.roots``), or a node
            failed to start (everything started is stopped again first).
    """
    say = progress or (lambda line: None)
    if not Path("/proc/self/stat").exists():
        raise ClusterError("local clusters need Linux (/proc); run hybridray up on Linux")
    if hosts not in ("local", "netns"):
        raise ClusterError(f"hosts must be 'local' or 'netns' (got {hosts!r})")
    if hosts == "netns":
        from hybridray.cluster import netns

        netns.require_support()
        if port or dashboard_port or tls:
            raise ClusterError("--port, --dashboard-port and --tls do not apply to --hosts "
                               "netns: every host uses the rendered ports and runs mutual TLS")
    specs = plan_nodes(topology, simulate=simulate)
    pools = elastic.elastic_pools(topology, simulate=simulate)
    if pools and hosts == "netns":
        raise ClusterError(
            f"elastic pools ({', '.join(p.node_type for p in pools)}: min/max) need --hosts "
            "local, where Ray's autoscaler starts their nodes as local processes; namespace "
            "hosts are started from rendered join scripts. Give each pool a count "
            "(e.g. sites.SITE.pools.0.count=1), or use --simulate")
    name = topology.name
    home_path = hybridray_home(home).expanduser().absolute()
    # autoscaled nodes get temp dirs ROOT/eSEQ: allow for six characters of them
    dirs = max(len(specs) * MAX_ATTEMPTS, ELASTIC_DIRS if pools else 0)
    temp_dir = _ray_temp_dir(name, home_path, dirs)
    _check_socket_paths(temp_dir, dirs)
    given_tls = _given_tls(tls) if isinstance(tls, dict) else {}  # checked before any change
    with cluster_lock(name, home_path):
        _clear_stale(name, home_path)
        check_storage_is_own(topology, home_path, simulate=simulate)
        check_pinned({"--port": port, "--dashboard-port": dashboard_port})
        state_dir = cluster_dir(name, home_path)
        token_path = state_dir / "token"
        try:
            _prepare_dirs(state_dir, temp_dir)
            write_token(token_path)
        except OSError as e:
            raise ClusterError(f"cannot prepare {state_dir} and {temp_dir}: {e}") from None
        if hosts == "netns":
            return _up_netns(topology, specs, name=name, home=home_path, temp_dir=temp_dir,
                             token_path=token_path, source_file=source_file,
                             overrides=overrides, simulate=simulate, dashboard=dashboard,
                             timeout=timeout, say=say)
        if tls is True:  # a CA of its own, in the state directory, gone at down
            from hybridray.deploy.certs import local_cert

            given_tls = local_cert(state_dir / "tls", name, _node_ip()).env()
        pinned = {p for p in (port, dashboard_port) if p is not None}
        picked = iter(free_ports(7, exclude=pinned))
        ports = {"gcs": port or next(picked), "dashboard": dashboard_port or next(picked),
                 "client_server": next(picked), "dashboard_metrics": next(picked),
                 "autoscaler_metrics": next(picked), "haproxy_metrics": next(picked),
                 "haproxy_stats": next(picked)}
        state = ClusterState(
            name=name, address=f"{_node_ip()}:{ports['gcs']}", token_path=str(token_path),
            temp_dir=temp_dir, home=str(home_path), ports=ports, dashboard=dashboard,
            simulate=simulate,
            source_file=str(Path(source_file).absolute()) if source_file else None,
            overrides=list(overrides), topology_snapshot=topology.model_dump(mode="json"),
            created_at=now_iso(), tls=given_tls)
        if pools:
            state.autoscaler = {"config": str(state_dir / elastic.CONFIG_FILE),
                                "interval_s": topology.head.autoscaler_interval_s,
                                "node_types": [p.node_type for p in pools]}
        save_state(state)
        claim_storage(topology, home_path)
        try:
            emulator.start_for(state, topology, simulate=simulate, say=say)  # cloud storage
            save_state(state)
            _start_nodes(state, specs, timeout=timeout, say=say, pinned=pinned,
                         topology=topology, pools=pools)
            _record_members(state)
        except BaseException as e:
            stopped = [n.key for n in elastic.stop_all(state.state_dir)]
            stopped += _stop_nodes(state.nodes, temp_dir=state.temp_dir)
            _remove_runtime(state)
            if isinstance(e, ClusterError):
                raise ClusterError(f"{e}\nstopped the {len(stopped)} node process(es) "
                                   "already started; nothing is left running") from None
            raise
        save_state(state)
    if not pools:
        return state
    # Outside the lock: the provider records each node it launches as a member under it.
    try:
        _wait_for_min_nodes(state, pools, timeout=timeout, say=say)
    except BaseException as e:
        stopped = down(name, home=home_path)
        if isinstance(e, ClusterError):
            raise ClusterError(f"{e}\nstopped the {len(stopped)} node process(es) already "
                               "started; nothing is left running") from None
        raise
    return load_state(name, home=home_path)


def _up_netns(topology: Topology, specs: list[NodeSpec], *, name: str, home: Path,
              temp_dir: str, token_path: Path, source_file, overrides, simulate: bool,
              dashboard: bool, timeout: float, say: Progress) -> ClusterState:
    from hybridray.cluster import nshosts

    state = ClusterState(
        name=name, address="", token_path=str(token_path), temp_dir=temp_dir, home=str(home),
        dashboard=dashboard, simulate=simulate,
        source_file=str(Path(source_file).absolute()) if source_file else None,
        overrides=list(overrides), topology_snapshot=topology.model_dump(mode="json"),
        created_at=now_iso())
    save_state(state)
    try:
        nshosts.up(topology, state=state, specs=specs, simulate=simulate,
                   timeout=max(timeout, nshosts.UP_TIMEOUT_S), say=say)
    except BaseException as e:
        stopped = _stop_nodes(state.nodes, temp_dir=state.temp_dir)
        _remove_runtime(state)
        if isinstance(e, ClusterError):
            raise ClusterError(f"{e}\nstopped the {len(stopped)} node process(es) already "
                               "started and removed every namespace and link made; nothing "
                               "is left running") from None
        raise
    save_state(state)
    return state


def _record_members(state: ClusterState) -> None:
    """Every node ``up`` started is a member; publish the record's copy into the KV (for the
    workers' guard). A node the GCS knows but ``up`` did not start is drift."""
    from hybridray.cluster import mirror
    from hybridray.cluster.gcs import GcsView

    state.members = [Member(n.node_id, n.site, n.key, n.pool, state.created_at, "up")
                     for n in state.nodes if n.node_id]
    with GcsView(state.address, state.token_path, state.tls) as view:
        mirror.publish(view, state)   # the snapshot: it holds the S3 emulator's endpoints


def _start_nodes(state: ClusterState, specs: list[NodeSpec], *, timeout: float, say: Progress,
                 pinned: set[int], topology: Topology,
                 pools: list[elastic.ElasticPool]) -> None:
    """Start every node; if one of Ray's own startup deadlines struck, start once more.

    Those deadlines (fixed inside Ray) strike on a machine too busy for the cluster's Python
    processes to start in time; the head cannot be replaced under running workers, so the
    whole start is repeated, on fresh ports, after stopping what the first one started.
    """
    _write_autoscaler_config(state, topology, pools)
    try:
        Startup(state, timeout=timeout, say=say).run(specs)
        return
    except ClusterError as e:
        if not getattr(e, "ray_gave_up", False):
            raise
        first = str(e).splitlines()[0]
    say(f"  Ray gave up on a slow start ({first}); starting the cluster once more")
    elastic.stop_all(state.state_dir)
    shutil.rmtree(elastic.elastic_dir(state.state_dir), ignore_errors=True)
    _stop_nodes(state.nodes, temp_dir=state.temp_dir)
    state.nodes.clear()
    for child in Path(state.temp_dir).iterdir():
        shutil.rmtree(child, ignore_errors=True)
    fresh = iter(free_ports(len(state.ports), exclude=pinned | set(state.ports.values())))
    state.ports = {k: v if v in pinned else next(fresh) for k, v in state.ports.items()}
    state.address = f"{state.address.rsplit(':', 1)[0]}:{state.ports['gcs']}"
    save_state(state)
    _write_autoscaler_config(state, topology, pools)
    Startup(state, timeout=timeout, say=say).run(specs)


def _write_autoscaler_config(state: ClusterState, topology: Topology,
                             pools: list[elastic.ElasticPool]) -> None:
    """The head's autoscaling config, for the GCS address this start uses."""
    if not pools:
        return
    config = elastic.autoscaling_config(topology, pools, name=state.name,
                                        gcs_address=state.address,
                                        state_dir=str(state.state_dir),
                                        temp_dir=state.temp_dir, home=state.home)
    elastic.write_config(config, state.state_dir)


def _wait_for_min_nodes(state: ClusterState, pools: list[elastic.ElasticPool], *,
                        timeout: float, say: Progress) -> None:
    """Until Ray's autoscaler has launched ``min`` nodes of every elastic pool and they
    registered; say which pools are elastic, and how far they may grow."""
    for p in pools:
        say(f"  {p.site:<14} {p.pool:<14} elastic {p.min_nodes}..{p.max_nodes} nodes "
            f"(Ray's autoscaler; idle timeout {p.idle_timeout_s:g}s)")
    want = {p.node_type: p.min_nodes for p in pools if p.min_nodes}
    if want:
        elastic.wait_for_nodes(state, want, timeout=timeout * max(want.values()),
                               what="the elastic pools' min nodes")
        say(f"  Ray's autoscaler started the elastic pools' min nodes ({sum(want.values())})")


def down(name: str, *, home: str | os.PathLike | None = None,
         timeout: float = STOP_TIMEOUT_S) -> list[int]:
    """Stop every node of cluster ``name`` (workers first, head last) and forget its state.

    Returns:
        The recorded ``ray start`` pids (each its node's process group) that still had
        processes running and were stopped; empty when the cluster was already down.

    Raises:
        ClusterNotFound: no cluster of that name was ever recorded under ``home``.
    """
    if not cluster_dir(name, home).is_dir():
        load_state(name, home=home)  # raises ClusterNotFound, listing the known clusters
    with cluster_lock(name, home, wait=LOCK_GRACE_S):
        try:
            state = load_state(name, home=home)
        except ClusterNotFound:
            return []  # down already ran; the directory only keeps the logs
        if state.attached:
            raise ClusterError(
                f"cluster {name!r} was attached, not started by hybridray: it owns none of its "
                f"processes, so down stops nothing. To forget it: hybridray detach {name}; to "
                "stop it, stop its nodes the way they were started (ray stop, systemctl, ...)")
        autoscaled = elastic.stop_all(state.state_dir,
                                      audit=AuditLog.for_cluster(state.name, state.home))
        stopped = _stop_nodes(state.nodes, timeout, temp_dir=state.temp_dir)
        _remove_runtime(state)
        return [n.raylet_pid for n in autoscaled if n.raylet_pid] + stopped


# ---- starting -----------------------------------------------------------------------------

def _ray_temp_dir(name: str, home: Path, nodes: int) -> str:
    """A short root for the cluster's Ray ``--temp-dir``s (one sub-directory per node).

    Nodes sharing one temp dir race for the same socket names when they start together,
    and the raylet that loses aborts; so each node gets ``ROOT/INDEX``. The root names the
    cluster and a hash of its hybridray home, so a cluster ``local`` of a test's home never
    meets the user's own ``local``; long names are hashed so the socket paths stay short.
    """
    digest = hashlib.sha1(str(home).encode()).hexdigest()
    root = f"/tmp/hr-{os.getuid()}-{name}-{digest[:6]}"
    if len(f"{root}/{nodes - 1}") + SOCKET_SUFFIX > MAX_SOCKET_PATH:
        short = hashlib.sha1(f"{home}/{name}".encode()).hexdigest()[:10]
        root = f"/tmp/hr-{os.getuid()}-{name[:8]}-{short}"
    return root


def _check_socket_paths(root: str, nodes: int) -> None:
    """Unix socket paths hold at most 107 bytes; Ray's go deep below the temp dir."""
    longest = len(f"{root}/{nodes - 1}") + SOCKET_SUFFIX
    if longest > MAX_SOCKET_PATH:
        over = longest - MAX_SOCKET_PATH
        raise ClusterError(
            f"Ray's socket paths under {root} would be {longest} bytes, over the "
            f"{MAX_SOCKET_PATH}-byte limit of unix sockets ({over} too many); start fewer "
            "nodes on this machine")


def _prepare_dirs(state_dir: Path, temp_dir: str) -> None:
    if state_dir.exists():  # logs of an earlier run that was brought down
        shutil.rmtree(state_dir)
    (state_dir / "logs").mkdir(parents=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    if os.path.lexists(temp_dir):
        st = os.lstat(temp_dir)
        if not os.path.isdir(temp_dir) or os.path.islink(temp_dir) or st.st_uid != os.getuid():
            raise ClusterError(f"{temp_dir} exists and is not a directory owned by you; Ray "
                               "would write sockets and logs there. Remove it and retry")
        users = processes_using(temp_dir + "/")
        if users:
            raise ClusterError(f"processes {', '.join(map(str, users[:8]))} still run from "
                               f"{temp_dir} (a cluster whose state was lost?); stop them, "
                               "then retry")
        shutil.rmtree(temp_dir, ignore_errors=True)
    os.mkdir(temp_dir, 0o700)


def _given_tls(tls: dict[str, str]) -> dict[str, str]:
    """The TLS variables for certificates the caller gives, once they are known to match."""
    from hybridray.deploy.certs import NodeCert, check_node_cert

    node = NodeCert(cert=Path(tls["RAY_TLS_SERVER_CERT"]), key=Path(tls["RAY_TLS_SERVER_KEY"]),
                    ca=Path(tls["RAY_TLS_CA_CERT"]))
    check_node_cert(node, _node_ip())
    return {k: v if k == "RAY_USE_TLS" else str(Path(v).absolute())
            for k, v in node.env().items()}


def _clear_stale(name: str, home: Path) -> None:
    """Refuse if ``name`` is running; forget it if every recorded process is gone."""
    try:
        old = load_state(name, home=home)
    except ClusterNotFound:
        return
    if old.attached:
        raise ClusterError(f"{name!r} is an attached cluster (GCS {old.address}); pick another "
                           f"name (override name=OTHER), or hybridray detach {name} first")
    alive = old.alive_nodes()
    autoscaled = [n for n in elastic.load_nodes(old.state_dir) if n.alive()]
    if alive or autoscaled:
        more = f" and {len(autoscaled)} autoscaled node(s)" if autoscaled else ""
        raise ClusterError(f"cluster {name!r} is already up ({len(alive)} of "
                           f"{len(old.nodes)} node processes{more} running, GCS at "
                           f"{old.address}); "
                           f"run hybridray down {name} first, or pick another name "
                           f"(override name=OTHER)")
    _remove_runtime(old)


def _node_ip() -> str:
    """The address Ray itself will advertise for this machine (it replaces 127.0.0.1)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


# ---- stopping -----------------------------------------------------------------------------

def _stop_nodes(nodes: list[NodeRecord], timeout: float = STOP_TIMEOUT_S, *,
                temp_dir: str = "") -> list[int]:
    """SIGTERM workers, then the head; SIGKILL each node's group for whatever remains, any
    process the nodes started outside their groups, and a Serve HAProxy still running with
    this cluster's config (orphaned when its manager actor died, it can linger 120 s)."""
    stopped = [n.pid for n in nodes if n.alive()]
    below = descendants([n.pid for n in nodes if n.leader_alive()])
    deadline = time.monotonic() + timeout
    workers = [n for n in nodes if n.role != "head"]
    heads = [n for n in nodes if n.role == "head"]
    for batch, share in ((workers, 0.6), (heads, 1.0)):
        for node in batch:
            if node.leader_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGTERM)
        batch_deadline = time.monotonic() + share * max(0.0, deadline - time.monotonic())
        _wait_gone(batch, batch_deadline)
    for node in nodes:  # leaders that ignored SIGTERM, and orphans of leaders killed earlier
        if node.group():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.pgid, signal.SIGKILL)
    _wait_gone(nodes, time.monotonic() + 5)
    for pid, started in below.items():   # same pid and start time: still the one we saw
        if process_start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    if temp_dir:   # only what runs with the HAProxy config this cluster gave its nodes
        for pid in processes_using(f"{temp_dir.rstrip('/')}/haproxy/"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return stopped


def _wait_gone(nodes: list[NodeRecord], deadline: float) -> None:
    """Wait for nodes to exit; pass SIGTERM on to a group whose leader left it behind.

    ``ray start --block`` stops its children on SIGTERM, but a leader that dies another way
    (SIGKILL, or SIGTERM before its handler is installed) orphans them, and they would
    linger until the SIGKILL at the end.
    """
    orphaned: set[str] = set()
    while True:
        for node in nodes:
            reap(node.pid)
            if node.key not in orphaned and not node.leader_alive() and node.group():
                orphaned.add(node.key)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(node.pgid, signal.SIGTERM)
        if not any(n.alive() for n in nodes) or time.monotonic() >= deadline:
            for node in nodes:  # one that exited since the reap above is a zombie now
                reap(node.pid)
            return
        time.sleep(0.1)


def _remove_runtime(state: ClusterState) -> None:
    """Forget a stopped cluster: its S3 server stops, namespace hosts and their links go,
    state and token go, node logs stay for a post-mortem."""
    emulator.stop_for(state)
    if state.netns:
        from hybridray.cluster import nshosts

        nshosts.stop(state)
    for path in (state.state_dir / "state.json", Path(state.token_path)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    shutil.rmtree(state.state_dir / "tls", ignore_errors=True)  # a CA made by up --tls
    temp = state.temp_dir
    if temp.startswith("/tmp/hr-") and os.path.isdir(temp) and not os.path.islink(temp):
        _keep_autoscaler_logs(temp, state.state_dir / "logs")
        shutil.rmtree(temp, ignore_errors=True)


def _keep_autoscaler_logs(temp: str, logs: Path) -> None:
    """Ray's autoscaler (and the elastic provider inside it) logs only into the head's
    session directory, which goes with the temp dir: keep its logs beside the nodes' own for
    a post-mortem of an elastic pool (``logs/autoscaler/``)."""
    import glob

    found = glob.glob(f"{temp}/0/session_*/logs/monitor.*")
    if not found:
        return
    out = logs / "autoscaler"
    out.mkdir(parents=True, exist_ok=True)
    for path in found:
        with contextlib.suppress(OSError):
            shutil.copy2(path, out / os.path.basename(path))
