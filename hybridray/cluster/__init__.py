"""Cluster records: ``up``/``down`` (local processes), ``attach``/``detach`` (a cluster you run),
``admit_nodes`` (membership), ``status``, and how a driver connects.

``up`` starts one real ``ray start`` process per node, labelled by site, and records it under
``$HYBRIDRAY_HOME/clusters/NAME``; ``down`` stops exactly those processes. ``attach`` writes
the same record for a cluster hybridray did not start; everything else reads only the
record. A driver connects with ``hybridray.connect(NAME)``, or by hand with
``apply_env(ray_env(state)); ray.init(address=state.address)`` (``apply_env`` also resets
what Ray cached from the environment, so it works after Ray was imported).
Importing this package does not import Ray; starting, inspecting or connecting does.
"""

from hybridray.cluster.attachment import attach, detach
from hybridray.cluster.auth import apply_env
from hybridray.cluster.local import down, up
from hybridray.cluster.membership import add_members, admit_nodes
from hybridray.cluster.state import ClusterState, NodeRecord, list_clusters, load_state
from hybridray.cluster.status import cluster_summaries, ray_env, status

__all__ = [
    "ClusterState", "NodeRecord", "add_members", "admit_nodes", "apply_env", "attach",
    "cluster_summaries", "detach", "down", "list_clusters", "load_state", "ray_env", "status",
    "up",
]
