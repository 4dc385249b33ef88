"""The fixed ports of a rendered cluster, and which of them must cross between sites.

A local cluster picks free ports (``hybridray.cluster.ports``); a real one pins them, because
firewalls, security groups and Kubernetes services are written against port numbers. Every
rendered ``ray start`` passes these explicitly, so the README's table is what actually runs.
"""

from __future__ import annotations

from dataclasses import dataclass

GCS = 6379
NODE_MANAGER = 6380
OBJECT_MANAGER = 6381
RUNTIME_ENV_AGENT = 6382
DASHBOARD_AGENT_GRPC = 6383
METRICS_EXPORT = 6384
DASHBOARD_AGENT_HTTP = 52365
DASHBOARD = 8265
CLIENT_SERVER = 10001
MIN_WORKER_PORT = 10002
MAX_WORKER_PORT = 10999


@dataclass(frozen=True)
class PortRule:
    """Traffic one kind of endpoint must accept: from where, and why."""

    ports: str
    on: str        # which machines listen
    source: str    # who must reach them
    why: str
    expose: str    # "sites" (over the VPN / private link), "operators", or "never"


RULES = [
    PortRule(str(GCS), "head", "every node at every site, drivers",
             "GCS: cluster membership, metadata, job table", "sites"),
    PortRule(f"{NODE_MANAGER}-{DASHBOARD_AGENT_GRPC}", "every node",
             "every node at every site",
             "raylet, object manager (object transfers), runtime-env and dashboard agents",
             "sites"),
    PortRule(f"{MIN_WORKER_PORT}-{MAX_WORKER_PORT}", "every node", "every node at every site",
             "worker processes: direct task and actor calls", "sites"),
    PortRule(str(METRICS_EXPORT), "every node", "your Prometheus only",
             "node metrics", "operators"),
    PortRule(str(DASHBOARD_AGENT_HTTP), "every node", "the head only",
             "dashboard agent (job supervisor, log reads)", "sites"),
    PortRule(str(DASHBOARD), "head", "operators and CI, over the VPN",
             "dashboard and Jobs API (ray job submit); unauthenticated HTTP apart from the "
             "token", "operators"),
    PortRule(str(CLIENT_SERVER), "head", "nobody",
             "Ray Client server: runs arbitrary code for whoever connects", "never"),
]


def ray_start_port_args(head: bool, node_ports: bool = True) -> list[str]:
    """``ray start`` arguments pinning every port this module lists.

    ``node_ports=False`` leaves the per-node ports to Ray (nodes sharing one machine: a
    ``provider: local`` site); the head's GCS, dashboard and client ports stay pinned.
    """
    args = ["--node-manager-port", str(NODE_MANAGER),
            "--object-manager-port", str(OBJECT_MANAGER),
            "--runtime-env-agent-port", str(RUNTIME_ENV_AGENT),
            "--dashboard-agent-grpc-port", str(DASHBOARD_AGENT_GRPC),
            "--dashboard-agent-listen-port", str(DASHBOARD_AGENT_HTTP),
            "--metrics-export-port", str(METRICS_EXPORT),
            "--min-worker-port", str(MIN_WORKER_PORT),
            "--max-worker-port", str(MAX_WORKER_PORT)] if node_ports else []
    if head:
        args += ["--port", str(GCS), "--dashboard-port", str(DASHBOARD),
                 "--dashboard-host", "0.0.0.0",
                 "--ray-client-server-port", str(CLIENT_SERVER)]
    return args
