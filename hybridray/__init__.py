"""hybridray: one Ray cluster across on-prem and cloud sites, placed by policy.

The public API is what ``__all__`` lists; everything else is internal and may change.
Importing hybridray does not import Ray: that happens when you connect or run work.
"""

from hybridray.api import Cluster, connect
from hybridray.audit import AuditLog
from hybridray.exceptions import (
    CertificateError,
    ClusterError,
    ClusterNotFound,
    ConfigError,
    DataError,
    DeployError,
    HybridRayError,
    IntegrityError,
    MaskingError,
    NetnsError,
    NodeNotMember,
    PlacementRefused,
    PlanInfeasible,
    ResidencyViolation,
    ResourceWaitTimeout,
    TrainError,
)
from hybridray.placement import (
    Capacity,
    Placement,
    Preference,
    Workload,
    WorkloadKind,
    actor_options,
    check_residency,
    child_options,
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

_LAZY = {"Demand": "hybridray.planner", "Plan": "hybridray.planner",
         "compare": "hybridray.planner", "plan": "hybridray.planner",
         "attach": "hybridray.cluster.attachment", "detach": "hybridray.cluster.attachment",
         "admit_nodes": "hybridray.cluster.membership"}


# Sub-packages reachable as attributes after a bare `import hybridray`, loaded on first use
# (`hybridray.serve.deploy(...)`, `hybridray.train.train(...)`); none imports Ray or torch.
_SUBPACKAGES = ("cluster", "serve", "storage", "train")


def __getattr__(name: str):
    # The planner pulls in SciPy; load it on first use so `import hybridray` stays light.
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"hybridray.{name}")
    raise AttributeError(f"module 'hybridray' has no attribute {name!r}")

__all__ = [
    "AuditLog",
    "Capacity",
    "CertificateError",
    "Cluster",
    "ClusterError",
    "ClusterNotFound",
    "ConfigError",
    "DataClass",
    "DataError",
    "Demand",
    "DeployError",
    "HybridRayError",
    "IntegrityError",
    "MaskingError",
    "NetnsError",
    "NodeNotMember",
    "Placement",
    "Plan",
    "PlacementRefused",
    "PlanInfeasible",
    "Preference",
    "ResidencyViolation",
    "ResourceWaitTimeout",
    "Topology",
    "TrainError",
    "Workload",
    "WorkloadKind",
    "__version__",
    "actor_options",
    "admit_nodes",
    "attach",
    "check_residency",
    "child_options",
    "compare",
    "connect",
    "data_remote_args",
    "decide",
    "detach",
    "guarded",
    "job_submit_kwargs",
    "load_topology",
    "parse_topology",
    "plan",
    "scaling_config",
    "serve_options",
    "task_options",
    "train_label_selectors",
]
