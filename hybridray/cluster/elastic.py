"""Elastic pools on one machine: Ray's autoscaler v2 sizes them, hybridray records what it did.

A pool with ``min``/``max`` is not started by ``hybridray up``. Instead the head gets an
autoscaling config (``autoscaler.yaml`` in the state directory) with one node type per elastic
pool, carrying the site's labels and resources, and runs Ray's autoscaler v2 with a local node
provider (``provider.py``, Ray's ``fake_multi_node`` provider with records of its own). Ray
decides when to add or remove a node, from the label selectors hybridray compiled: a task that
may run only on-prem never matches a cloud node type, so it never makes Ray start one.

What the provider launched is written down as it happens, so every other process can see it:

* ``elastic/nodes/SEQ.json``: one file per node while it runs: its processes (pid *and* start
  time), temp dir, site, pool and price; removed when the node stops. ``down`` stops these.
* the cluster's audit log: a ``node-launch`` and a ``node-stop`` record per node, which is what
  cost per node-second, ``status``, the metrics and the demo report are computed from.
* ``elastic/STOP``: written by ``down`` before it stops anything; the provider refuses to
  launch once it exists, so nothing new can start while the cluster is brought down.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hybridray.procs import descendants, process_start_time
from hybridray.topology.models import Provider, Topology

HEAD_NODE_TYPE = "ray.head.default"
# The cloud instance id (and node id) of the head: the one Ray's local provider expects
# (ray.autoscaler._private.fake_multi_node.node_provider.FAKE_HEAD_NODE_ID), which
# `ray start --head` gives the head itself when RAY_FAKE_CLUSTER is set.
HEAD_INSTANCE_ID = "f" * 51 + "00000"
PROVIDER_CLASS = "hybridray.cluster.provider.LocalElasticProvider"
CONFIG_FILE = "autoscaler.yaml"
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class ElasticPool:
    """One elastic pool as a node type of Ray's autoscaler."""

    node_type: str            # "SITE.POOL"
    site: str
    pool: str
    min_nodes: int
    max_nodes: int
    idle_timeout_s: float
    cpus: int
    gpus: int
    memory_bytes: int
    object_store_bytes: int
    price_per_hour: float
    spot: bool
    labels: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)


def node_type_name(site: str, pool: str) -> str:
    return f"{site}.{pool}"


def elastic_pools(topology: Topology, *, simulate: bool = False) -> list[ElasticPool]:
    """The elastic pools of a local cluster, in topology order (none when ``simulate``:
    a simulated topology runs one static node per pool)."""
    from hybridray.cluster.plan import NODE, pool_spec

    if simulate:
        return []
    out = []
    for site_name, site in topology.sites.items():
        if site.provider is not Provider.local:
            continue
        for pool in site.pools:
            if not pool.elastic:
                continue
            spec = pool_spec(topology, site_name, pool, 0)
            out.append(ElasticPool(
                node_type=node_type_name(site_name, pool.name), site=site_name, pool=pool.name,
                min_nodes=pool.min_nodes, max_nodes=pool.max_nodes,
                idle_timeout_s=pool.idle_timeout, cpus=spec.cpus, gpus=spec.gpus,
                memory_bytes=spec.memory_bytes or 0, object_store_bytes=spec.object_store_bytes,
                price_per_hour=pool.price_per_node_hour, spot=pool.spot,
                labels={k: v for k, v in spec.labels.items() if k != NODE},
                resources=dict(spec.resources)))
    return out


def autoscaling_config(topology: Topology, pools: list[ElasticPool], *, name: str,
                       gcs_address: str, state_dir: str, temp_dir: str, home: str
                       ) -> dict[str, Any]:
    """The cluster config Ray's autoscaler v2 reads (``ray start --autoscaling-config``).

    One node type per elastic pool (its site's labels, CPUs, GPUs, memory, object store and
    site resource; ``min_workers``/``max_workers`` from ``min``/``max``; the pool's
    ``idle_timeout_s``) plus the head, which the autoscaler never launches. The provider
    section names hybridray's local provider and what it needs to start and record nodes.
    """
    head = topology.head
    types: dict[str, Any] = {HEAD_NODE_TYPE: {
        "resources": {"CPU": int(head.cpus)}, "node_config": {}, "max_workers": 0}}
    node_info: dict[str, Any] = {}
    for p in pools:
        resources: dict[str, float] = {"CPU": p.cpus, **p.resources}
        if p.gpus:
            resources["GPU"] = p.gpus
        resources["memory"] = p.memory_bytes
        resources["object_store_memory"] = p.object_store_bytes
        types[p.node_type] = {
            "resources": resources, "labels": dict(p.labels), "node_config": {},
            "min_workers": p.min_nodes, "max_workers": p.max_nodes,
            "idle_timeout_s": p.idle_timeout_s}
        node_info[p.node_type] = {"site": p.site, "pool": p.pool,
                                  "price_per_hour": p.price_per_hour, "spot": p.spot}
    return {
        "cluster_name": name,
        "max_workers": sum(p.max_nodes for p in pools),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": max(p.idle_timeout_s for p in pools) / 60 if pools else 5,
        "provider": {
            "type": "external", "module": PROVIDER_CLASS,
            "gcs_address": gcs_address, "head_node_id": HEAD_INSTANCE_ID,
            "launch_multiple": True, "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "hybridray": {"cluster": name, "home": home, "state_dir": state_dir,
                          "temp_dir": temp_dir, "node_types": node_info},
        },
        "auth": {"ssh_user": "hybridray"},
        "available_node_types": types,
        "head_node_type": HEAD_NODE_TYPE,
        "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def head_env(interval_s: int) -> dict[str, str]:
    """What the head's ``ray start`` needs to run the v2 autoscaler with the local provider."""
    return {"RAY_enable_autoscaler_v2": "1",
            "RAY_FAKE_CLUSTER": "1",            # Ray's local provider refuses to run without it
            "RAY_CLOUD_INSTANCE_ID": HEAD_INSTANCE_ID,
            "AUTOSCALER_UPDATE_INTERVAL_S": str(int(interval_s))}


def write_config(config: dict[str, Any], state_dir: Path) -> Path:
    path = state_dir / CONFIG_FILE
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return path


# ---- what the provider launched -------------------------------------------------------------

def elastic_dir(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / "elastic"


@dataclass
class ElasticNode:
    """A node Ray's autoscaler launched: which pool, which processes, since when."""

    key: str                     # "SITE.POOL.SEQ"; also its hybridray.io/node label
    seq: int
    node_id: str                 # Ray node id == cloud instance id
    node_type: str
    site: str
    pool: str
    temp_dir: str
    launched_at: float           # epoch seconds
    price_per_hour: float = 0.0
    cpus: float = 0
    gpus: int = 0
    spot: bool = False
    pids: dict[str, int] = field(default_factory=dict)   # pid -> start time (clock ticks)

    def live_pids(self) -> list[int]:
        return [int(p) for p, t in self.pids.items() if process_start_time(int(p)) == t]

    def alive(self) -> bool:
        return bool(self.live_pids())

    @property
    def raylet_pid(self) -> int | None:
        return int(next(iter(self.pids))) if self.pids else None

    def raylet_alive(self) -> bool:
        pid = self.raylet_pid
        return pid is not None and process_start_time(pid) == self.pids[str(pid)]


def record_path(state_dir: str | os.PathLike, seq: int) -> Path:
    return elastic_dir(state_dir) / "nodes" / f"{seq}.json"


def save_node(state_dir: str | os.PathLike, node: ElasticNode) -> None:
    """Write a node's record atomically (the provider, as soon as its processes exist)."""
    path = record_path(state_dir, node.seq)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(node)), encoding="utf-8")
    os.replace(tmp, path)


def forget_node(state_dir: str | os.PathLike, seq: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(state_dir, seq).unlink()


def load_nodes(state_dir: str | os.PathLike) -> list[ElasticNode]:
    """Every node the provider launched and has not stopped, in launch order."""
    folder = elastic_dir(state_dir) / "nodes"
    if not folder.is_dir():
        return []
    out = []
    for path in folder.glob("*.json"):
        try:
            out.append(ElasticNode(**json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue  # removed or half-written while we looked; the next look sees it
    return sorted(out, key=lambda n: n.seq)


def next_seq(state_dir: str | os.PathLike) -> int:
    """The sequence number for the next launch (also after the autoscaler restarts)."""
    counter = elastic_dir(state_dir) / "seq"
    try:
        last = int(counter.read_text())
    except (OSError, ValueError):
        last = 0
    counter.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    counter.write_text(str(last + 1))
    return last + 1


@contextlib.contextmanager
def launch_lock(state_dir: str | os.PathLike) -> Iterator[None]:
    """Held by the provider while it starts a node, and by ``down`` before it stops them."""
    folder = elastic_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def stopping(state_dir: str | os.PathLike) -> bool:
    return (elastic_dir(state_dir) / "STOP").exists()


def stop_all(state_dir: str | os.PathLike, *, audit: Any = None,
             timeout: float = STOP_GRACE_S) -> list[ElasticNode]:
    """Stop every node the provider launched, and make sure it launches no more.

    Writes ``STOP`` first, then waits for a launch in progress to finish (the provider holds
    the launch lock while it starts a node), so the records read afterwards are complete.
    Each node's recorded processes and everything below them get SIGTERM, then SIGKILL.

    Returns:
        The nodes that still had processes running.
    """
    folder = elastic_dir(state_dir)
    if not folder.is_dir():
        return []
    (folder / "STOP").touch()
    with launch_lock(state_dir):
        nodes = load_nodes(state_dir)
    running = [n for n in nodes if n.alive()]
    targets: dict[int, int] = {}
    for node in running:
        mine = {int(p): t for p, t in node.pids.items() if process_start_time(int(p)) == t}
        targets.update(mine)
        targets.update(descendants(list(mine)))
    for pid, started in targets.items():
        if process_start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
            process_start_time(p) == t for p, t in targets.items()):
        time.sleep(0.1)
    for pid, started in targets.items():
        if process_start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    now = time.time()
    for node in nodes:
        forget_node(state_dir, node.seq)
        if audit is not None and node in running:
            audit.record("node-stop", **node_fields(node), reason="down",
                         ended_at=round(now, 6), up_s=round(now - node.launched_at, 3))
    return running


def node_fields(node: ElasticNode) -> dict[str, Any]:
    """The fields every ``node-launch``/``node-stop`` audit record carries."""
    return {"key": node.key, "node_id": node.node_id, "node_type": node.node_type,
            "site": node.site, "pool": node.pool, "price_per_hour": node.price_per_hour,
            "cpus": node.cpus, "spot": node.spot, "launched_at": round(node.launched_at, 6)}


# ---- what it cost: node-seconds actually up ----------------------------------------------

@dataclass(frozen=True)
class NodeSpan:
    """One autoscaled node's life, from its launch to its stop (or ``now``)."""

    key: str
    site: str
    pool: str
    start: float
    end: float
    price_per_hour: float
    running: bool
    reason: str | None = None   # why it stopped: idle, lost, down, ...

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def cost(self) -> float:
        return self.seconds / 3600 * self.price_per_hour


def spans(records: list[dict[str, Any]], *, now: float, since: float = 0.0,
          alive: set[str] | None = None) -> list[NodeSpan]:
    """Each autoscaled node's span from the audit log's ``node-launch``/``node-stop`` records.

    A node launched and never stopped counts up to ``now`` while it runs; one the audit log
    saw launched but whose processes are gone (``alive`` does not list its key: the cluster
    crashed) ends at the last record seen, since nothing proves it was up longer.
    """
    out: dict[str, dict[str, Any]] = {}
    last = since
    for r in records:
        ts = r.get("ts", 0.0)
        if ts < since:
            continue
        last = max(last, ts)
        if r.get("event") == "node-launch":   # billed from the moment it was asked for
            out[r["key"]] = {"r": r, "start": r.get("launched_at") or ts, "end": None,
                             "reason": None}
        elif r.get("event") == "node-stop" and r.get("key") in out:
            out[r["key"]]["end"] = r.get("ended_at") or ts   # when the node went down
            out[r["key"]]["reason"] = r.get("reason")
    result = []
    for key, v in out.items():
        r = v["r"]
        running = v["end"] is None and (alive is None or key in alive)
        end = v["end"] if v["end"] is not None else (now if running else last)
        result.append(NodeSpan(key, r.get("site", "?"), r.get("pool", "?"), v["start"], end,
                               float(r.get("price_per_hour", 0.0)), running, v["reason"]))
    return sorted(result, key=lambda s: s.start)


def nodes_over_time(node_spans: list[NodeSpan], *, start: float, end: float,
                    step: float = 1.0) -> tuple[list[float], dict[str, list[int]]]:
    """Autoscaled nodes per site sampled every ``step`` seconds (for the report's plot)."""
    times, counts = [], {s.site: [] for s in node_spans}
    t = start
    while t <= end + 1e-9:
        times.append(t - start)
        for site in counts:
            counts[site].append(sum(1 for s in node_spans
                                    if s.site == site and s.start <= t < max(s.end, s.start)))
        t += step
    return times, counts


def wait_for_nodes(state: Any, want: dict[str, int], *, timeout: float,
                   what: str = "the requested nodes") -> dict[str, int]:
    """Until at least ``want[node_type]`` autoscaled nodes of each type have joined the GCS.

    Returns:
        How many of each type had joined.

    Raises:
        ClusterError: they did not within ``timeout`` seconds (naming the monitor's log).
    """
    from hybridray.cluster.gcs import GcsView
    from hybridray.exceptions import ClusterError

    deadline = time.monotonic() + timeout
    with GcsView(state.address, state.token_path, state.tls) as gcs:
        while True:
            alive = {n.node_id for n in gcs.nodes(timeout=5) if n.alive}
            have: dict[str, int] = {}
            for node in load_nodes(state.state_dir):
                if node.node_id in alive:
                    have[node.node_type] = have.get(node.node_type, 0) + 1
            if all(have.get(t, 0) >= n for t, n in want.items()):
                return have
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"cluster {state.name!r}: Ray's autoscaler did not start {what} in "
                    f"{timeout:.0f}s (" + ", ".join(f"{t}: {have.get(t, 0)} of {n}"
                                                    for t, n in want.items())
                    + f"); its log is {state.temp_dir}/0/session_latest/logs/monitor.log")
            time.sleep(0.5)
