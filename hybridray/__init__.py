"""hybridray: one Ray cluster across on-prem and cloud sites, placed by policy.

The public API is what ``__all__`` lists; everything else is internal and may change.
Importing hybridray does not import Ray: that happens when you connect or run work.
"""

from hybridray.api import Cluster, connect
from hybridray.audit import AuditLog
from hybridray.exceptions import (
    ClusterError,
    ClusterNotFound,
    ConfigError,
    HybridRayError,
    PlacementRefused,
    PlanInfeasible,
    ResidencyViolation,
)
from hybridray.placement import (
    Capacity,
    Placement,
    Preference,
    Workload,
    WorkloadKind,
    actor_options,
    check_residency,
    data_remote_args,
    decide,
    guarded,
    job_submit_kwargs,
    scaling_config,
    serve_options,
    task_options,
    train_label_selectors,
)
from hybridray.topology import DataClass, Topology, load_topology, parse_topology

__version__ = "0.1.0"

__all__ = [
    "AuditLog",
    "Capacity",
    "Cluster",
    "ClusterError",
    "ClusterNotFound",
    "ConfigError",
    "DataClass",
    "HybridRayError",
    "Placement",
    "PlacementRefused",
    "PlanInfeasible",
    "Preference",
    "ResidencyViolation",
    "Topology",
    "Workload",
    "WorkloadKind",
    "__version__",
    "actor_options",
    "check_residency",
    "connect",
    "data_remote_args",
    "decide",
    "guarded",
    "job_submit_kwargs",
    "load_topology",
    "parse_topology",
    "scaling_config",
    "serve_options",
    "task_options",
    "train_label_selectors",
]
