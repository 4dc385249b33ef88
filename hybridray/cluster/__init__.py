"""Local multi-site Ray clusters: ``up``, ``down``, ``status``, and how a driver connects.

``up`` starts one real ``ray start`` process per node, labelled by site, and records it under
``$HYBRIDRAY_HOME/clusters/NAME``; ``down`` stops exactly those processes. A driver connects
with ``os.environ.update(ray_env(state)); ray.init(address=state.address)``; a process that
switches between clusters calls ``apply_env(ray_env(state))`` instead (Ray caches the token).
Importing this package does not import Ray; starting, inspecting or connecting does.
"""

from hybridray.cluster.auth import apply_env
from hybridray.cluster.local import down, up
from hybridray.cluster.state import ClusterState, NodeRecord, list_clusters, load_state
from hybridray.cluster.status import cluster_summaries, ray_env, status

__all__ = [
    "ClusterState", "NodeRecord", "apply_env", "cluster_summaries", "down", "list_clusters",
    "load_state", "ray_env", "status", "up",
]
