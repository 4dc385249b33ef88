"""The cluster record: what hybridray knows about a cluster, kept on disk for any later process.

One record however the cluster came to be. ``hybridray up`` writes it for the processes it
starts; ``hybridray attach`` writes the same record for a cluster it did not start (no
processes, only an address, credentials and a topology). Every command and
``hybridray.connect()`` read only this record: address, auth (token path), TLS files,
dashboard URL, topology, and the **members** — the Ray nodes known to belong. A live node that
is not a member is drift and never receives placed work (``membership.py``).

``hybridray up`` may exit long before ``hybridray down`` runs, in another shell or after a
reboot, so everything needed to reach or stop a cluster lives in
``$HYBRIDRAY_HOME/clusters/NAME/state.json``. A pid alone is not an identity: the kernel
recycles pids, so each node also records its process start time (``/proc/PID/stat`` field 22)
and a process is only ever "ours" while both match. ``down`` deletes ``state.json`` and the
token but keeps the directory with the node logs, which is how "already down" differs from
"never heard of it".
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridray.exceptions import ClusterError, ClusterNotFound
from hybridray.home import hybridray_home  # noqa: F401  (re-exported)
from hybridray.procs import (  # noqa: F401  (re-exported for the cluster's callers)
    descendants,
    group_members,
    process_start_time,
    processes_using,
    reap,
)
from hybridray.topology.models import NAME_PATTERN, Topology

STATE_VERSION = 1
_NAME_RE = re.compile(NAME_PATTERN)


def clusters_dir(home: str | os.PathLike | None = None) -> Path:
    return hybridray_home(home) / "clusters"


def cluster_dir(name: str, home: str | os.PathLike | None = None) -> Path:
    """``$HYBRIDRAY_HOME/clusters/NAME`` (the name is checked, so it never escapes the home)."""
    if not _NAME_RE.match(name):
        raise ClusterNotFound(
            f"{name!r} is not a cluster name (names are lowercase letters, digits and '-'); "
            f"recorded clusters: {', '.join(list_clusters(home)) or 'none'}")
    return clusters_dir(home) / name


# ---- records ------------------------------------------------------------------------------

@dataclass
class NodeRecord:
    """One ``ray start --block`` process: which node it is and how to recognise it later."""

    key: str                  # "head" or "SITE.POOL.INDEX"; also the hybridray.io/node label
    site: str
    pool: str | None          # None for the head
    role: str                 # "head" or "worker"
    index: int
    pid: int
    pgid: int
    start_time: int           # /proc/PID/stat field 22 at launch
    log: str
    temp_dir: str = ""        # this node's Ray --temp-dir
    cpus: float = 0
    gpus: int = 0
    price_per_hour: float = 0.0
    agent_port: int | None = None
    node_id: str | None = None

    def leader_alive(self) -> bool:
        """The recorded ``ray start`` process itself still runs (same pid *and* start time)."""
        return process_start_time(self.pid) == self.start_time

    def group(self) -> list[int]:
        """Live processes of this node's process group (the leader or its orphans).

        Empty when the pgid now belongs to someone else: a recycled pid that leads a new
        group has a different start time, so its group is not ours.
        """
        leader = process_start_time(self.pgid)
        if leader is not None and leader != self.start_time:
            return []
        return group_members(self.pgid, not_before=self.start_time)

    def alive(self) -> bool:
        return self.leader_alive() or bool(self.group())


@dataclass
class Member:
    """A Ray node known to belong to the cluster: placed work may run on it."""

    node_id: str              # Ray's node id (hex); Ray sets the ray.io/node-id label from it
    site: str
    key: str | None = None    # the hybridray.io/node label, when the node carries one
    pool: str | None = None
    admitted_at: str = ""
    how: str = "up"           # up | attach | admit | autoscaler | ...


ORIGIN_UP = "up"
ORIGIN_ATTACH = "attach"


@dataclass
class ClusterState:
    """A recorded cluster: where it is, how to reach it, which nodes belong, what runs.

    ``origin`` says how it came to be: ``up`` (hybridray started its processes, listed in
    ``nodes``) or ``attach`` (an operator runs it; ``nodes`` is empty and liveness comes from
    the GCS only). ``members`` lists the node ids that belong; for ``up`` they are the nodes it
    started.
    """

    name: str
    address: str                      # GCS host:port
    token_path: str
    temp_dir: str                     # Ray's --temp-dir for every node
    home: str                         # the HYBRIDRAY_HOME it is recorded under
    ports: dict[str, int] = field(default_factory=dict)
    dashboard: bool = True
    simulate: bool = False
    source_file: str | None = None
    overrides: list[str] = field(default_factory=list)
    topology_snapshot: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    nodes: list[NodeRecord] = field(default_factory=list)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. the S3 server
    tls: dict[str, str] = field(default_factory=dict)  # RAY_USE_TLS + paths, when TLS is on
    netns: dict[str, Any] = field(default_factory=dict)  # namespace hosts (netns.NetRecord)
    # elastic pools: {"config": autoscaler.yaml, "interval_s": N, "node_types": [...]}; the
    # nodes Ray's autoscaler launched are recorded apart (elastic.py), never in `nodes`
    autoscaler: dict[str, Any] = field(default_factory=dict)
    version: int = STATE_VERSION
    origin: str = ORIGIN_UP
    dashboard_address: str | None = None   # attach: the URL given (up derives it from ports)
    members: list[Member] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return clusters_dir(self.home) / self.name

    @property
    def attached(self) -> bool:
        """True for a cluster hybridray did not start (no processes of its own to stop)."""
        return self.origin == ORIGIN_ATTACH

    @property
    def dashboard_url(self) -> str | None:
        """The dashboard (and Jobs API) URL, or None when the cluster has none: the URL
        attach recorded; for ``up``, loopback for a local cluster, the head's own address
        for namespace hosts."""
        if self.dashboard_address:
            return self.dashboard_address
        if not self.dashboard or "dashboard" not in self.ports:
            return None
        host = self.address.rsplit(":", 1)[0] if self.netns else "127.0.0.1"
        return f"http://{host}:{self.ports['dashboard']}"

    @property
    def head(self) -> NodeRecord:
        """The head's process record (``up`` clusters only)."""
        head = next((n for n in self.nodes if n.role == "head"), None)
        if head is None:
            raise ClusterError(f"cluster {self.name!r} was attached, so hybridray has no "
                               "process of its own for its head")
        return head

    def member_ids(self) -> set[str]:
        """Node ids that belong. A record written before membership existed counts the
        nodes ``up`` started."""
        if self.members:
            return {m.node_id for m in self.members}
        return {n.node_id for n in self.nodes if n.node_id}

    def topology(self) -> Topology:
        """The topology this cluster runs, reloaded from its file and overrides.

        Falls back to the snapshot taken at ``up`` when the cluster was started from a
        ``Topology`` object or the file has gone since.
        """
        if self.source_file and Path(self.source_file).exists():
            from hybridray.topology import load_topology

            return load_topology(self.source_file, self.overrides)
        return Topology.model_validate(self.topology_snapshot)

    def alive_nodes(self) -> list[NodeRecord]:
        return [n for n in self.nodes if n.alive()]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterState:
        data = dict(data)
        nodes = [NodeRecord(**n) for n in data.pop("nodes", [])]
        members = [Member(**m) for m in data.pop("members", [])]
        return cls(**data, nodes=nodes, members=members)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- persistence --------------------------------------------------------------------------

def state_file(name: str, home: str | os.PathLike | None = None) -> Path:
    return cluster_dir(name, home) / "state.json"


def save_state(state: ClusterState) -> None:
    """Write ``state.json`` atomically: a reader sees the old file or the new, never half."""
    path = state.state_dir / "state.json"
    tmp = path.with_name(f".state.json.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(state.to_json(), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(name: str, *, home: str | os.PathLike | None = None) -> ClusterState:
    """The record of cluster ``name`` (started by ``up`` or recorded by ``attach``).

    Raises:
        ClusterNotFound: nothing is recorded under that name (the message lists what is).
        ClusterError: ``state.json`` exists but cannot be read.
    """
    path = state_file(name, home)
    if not path.exists():
        known = ", ".join(list_clusters(home)) or "none"
        if path.parent.is_dir():
            raise ClusterNotFound(f"cluster {name!r} is down; start it with "
                                  f"hybridray up FILE (recorded clusters: {known})")
        raise ClusterNotFound(f"no cluster named {name!r} under {clusters_dir(home)} "
                              f"(recorded clusters: {known}); start one with hybridray up "
                              "FILE, or record one you run with hybridray attach")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"state version {data.get('version')!r}, expected {STATE_VERSION}")
        return ClusterState.from_json(data)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ClusterError(f"{path}: unreadable cluster state ({e}); stop any processes it "
                           f"started by hand, then remove {path.parent}") from None


def list_clusters(home: str | os.PathLike | None = None) -> list[str]:
    """Names of the clusters recorded under ``home`` (up, or crashed without ``down``)."""
    root = clusters_dir(home)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if _NAME_RE.match(p.name) and (p / "state.json").is_file())


@contextlib.contextmanager
def cluster_lock(name: str, home: str | os.PathLike | None = None, *,
                 wait: bool | float = False) -> Iterator[None]:
    """Serialise ``up``/``down``/``attach``/``admit`` of one cluster name across processes
    (``wait``: True blocks until the other one is done instead of refusing; a number waits
    at most that many seconds, for holders known to be brief, such as the provider of an
    elastic pool recording a node it launched or Ray stopped)."""
    root = clusters_dir(home)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + (wait if not isinstance(wait, bool) else 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait is True else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ClusterError(f"another hybridray up/down/admit of {name!r} is "
                                       "running; wait for it to finish") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)
