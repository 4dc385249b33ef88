"""Which nodes a local cluster runs and the ``ray start`` command line of each, as pure data.

Deciding *what* to start is kept apart from starting it (``local.py``), so the decision can be
read and tested without launching anything: one ``NodeSpec`` per node, built from the
topology, and one function that turns a spec plus its ports into ``ray start`` arguments.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from hybridray.exceptions import ClusterError
from hybridray.labels import labels_arg, node_labels, node_resources
from hybridray.topology.models import NodePool, Provider, Topology

NODE = "hybridray.io/node"   # label naming the node ("head" or "SITE.POOL.INDEX"), set here only
SIMULATE_MAX_CPUS = 2
SIMULATE_OBJECT_STORE_MB = 100


@dataclass(frozen=True)
class NodeSpec:
    """One node to start: where it belongs and what it declares to Ray."""

    key: str
    site: str
    pool: str | None
    role: str
    index: int
    cpus: int
    gpus: int
    memory_bytes: int | None
    object_store_bytes: int
    labels: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)
    price_per_hour: float = 0.0


def plan_nodes(topology: Topology, *, simulate: bool = False) -> list[NodeSpec]:
    """The head first, then the ``count`` nodes of every static pool of every site.

    Elastic pools (``min``/``max``) are not here: Ray's autoscaler starts and stops their
    nodes, ``min`` of them from the start (``hybridray.cluster.elastic``).

    With ``simulate`` every site runs as local processes whatever its provider, one static
    node per pool (so a site whose pools start at ``min: 0`` still shows up), at most
    ``SIMULATE_MAX_CPUS`` CPUs and a ``SIMULATE_OBJECT_STORE_MB`` object store per node, so a
    large topology fits a laptop. Labels, custom resources and GPUs stay as declared.

    Raises:
        ClusterError: a site is not ``provider: local`` (without ``simulate``), or a local
            node asks for a fractional number of CPUs.
    """
    if not simulate:
        remote = [f"{name} ({site.provider.value})" for name, site in topology.sites.items()
                  if site.provider is not Provider.local]
        if remote:
            raise ClusterError(
                f"cluster {topology.name!r}: hybridray up starts only provider: local sites, "
                f"and {', '.join(remote)} {'is' if len(remote) == 1 else 'are'} not local. "
                "Use hybridray render for real sites, or hybridray up FILE --simulate to run "
                "every site as local processes")
    specs = [head_spec(topology, simulate=simulate)]
    for site_name, site in topology.sites.items():
        for pool in site.pools:
            specs += [pool_spec(topology, site_name, pool, i, simulate=simulate)
                      for i in range(_node_count(pool, simulate))]
    return specs


def head_spec(topology: Topology, *, simulate: bool = False) -> NodeSpec:
    """The head node: ``head.cpus`` logical CPUs at ``head.site``, labelled ``role=head``."""
    head = topology.head
    return NodeSpec(
        key="head", site=head.site, pool=None, role="head", index=0,
        cpus=_whole_cpus(head.cpus, "head.cpus", simulate),
        gpus=0, memory_bytes=None,
        object_store_bytes=_object_store_mb(head.object_store_mb, simulate) * 2**20,
        labels={**node_labels(topology, head.site, None, role="head"), NODE: "head"},
        resources=node_resources(head.site, None),
    )


def pool_spec(topology: Topology, site_name: str, pool: NodePool, index: int, *,
              simulate: bool = False) -> NodeSpec:
    """Node ``index`` of ``pool`` at ``site_name``: its labels, resources and sizes."""
    p = topology.sites[site_name].pools.index(pool)
    key = f"{site_name}.{pool.name}.{index}"
    return NodeSpec(
        key=key, site=site_name, pool=pool.name, role="worker", index=index,
        cpus=_whole_cpus(pool.cpus, f"sites.{site_name}.pools[{p}].cpus", simulate),
        gpus=pool.gpus,
        memory_bytes=int(pool.memory_gb * 2**30),
        object_store_bytes=_object_store_mb(pool.object_store_mb, simulate) * 2**20,
        labels={**node_labels(topology, site_name, pool, role="worker"), NODE: key},
        resources=node_resources(site_name, pool),
        price_per_hour=pool.price_per_node_hour,
    )


def _node_count(pool: NodePool, simulate: bool) -> int:
    if simulate:
        return 1 if pool.max_nodes > 0 else 0
    return 0 if pool.elastic else pool.min_nodes


def _whole_cpus(cpus: float, where: str, simulate: bool) -> int:
    if simulate:
        return min(max(math.ceil(cpus), 0), SIMULATE_MAX_CPUS)
    if cpus != int(cpus):
        raise ClusterError(f"{where}: a local node declares whole CPUs (got {cpus}); "
                           f"set {math.floor(cpus) or 1} or {math.ceil(cpus)}")
    return int(cpus)


def _object_store_mb(mb: int, simulate: bool) -> int:
    return min(mb, SIMULATE_OBJECT_STORE_MB) if simulate else mb


def node_args(spec: NodeSpec) -> list[str]:
    """What a node declares to Ray (CPUs, GPUs, memory, object store, labels, resources) as
    ``ray start`` arguments: shared by local nodes and every rendered deployment file."""
    args = ["--num-cpus", str(spec.cpus), "--num-gpus", str(spec.gpus),
            "--object-store-memory", str(spec.object_store_bytes),
            "--labels", labels_arg(spec.labels),
            "--resources", json.dumps(spec.resources, separators=(",", ":"))]
    if spec.memory_bytes is not None:
        args += ["--memory", str(spec.memory_bytes)]
    return args


def ray_start_args(spec: NodeSpec, *, temp_dir: str, gcs_address: str | None,
                   ports: dict[str, int], agent_port: int, dashboard: bool = True,
                   autoscaling_config: str | None = None) -> list[str]:
    """``ray start`` arguments (after ``ray start``) for one node.

    ``ports`` holds the cluster-wide ports (``gcs``, ``dashboard``, ``client_server``) and
    ``agent_port`` this node's dashboard agent port: Ray's defaults (6379, 8265, 10001,
    52365) would collide between two clusters, or two nodes, on one machine. The head of a
    cluster with elastic pools gets ``autoscaling_config``, which its autoscaler reads.
    """
    args = ["--block", "--disable-usage-stats", "--temp-dir", temp_dir, *node_args(spec),
            "--dashboard-agent-listen-port", str(agent_port)]
    if spec.role == "head":
        args += ["--head", "--port", str(ports["gcs"]),
                 "--ray-client-server-port", str(ports["client_server"]),
                 "--include-dashboard", "true" if dashboard else "false",
                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"])]
        if autoscaling_config:
            args += ["--autoscaling-config", autoscaling_config]
    else:
        if gcs_address is None:
            raise ValueError("a worker node needs the head's GCS address")
        args += ["--address", gcs_address]
    return args
