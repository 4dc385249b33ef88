"""Placement by policy: workloads in, decisions out, compiled to Ray's native options."""

from hybridray.placement.capacity import Capacity, NodeCapacity
from hybridray.placement.compile import (
    actor_options,
    data_remote_args,
    job_submit_kwargs,
    scaling_config,
    serve_options,
    site_selector,
    task_options,
    train_label_selectors,
)
from hybridray.placement.decision import Candidate, Placement, Refusal
from hybridray.placement.guard import check_residency, child_options, guarded
from hybridray.placement.policy import decide
from hybridray.placement.workload import Preference, Workload, WorkloadKind

__all__ = [
    "Candidate", "Capacity", "NodeCapacity", "Placement", "Preference", "Refusal", "Workload",
    "WorkloadKind", "actor_options", "check_residency", "child_options", "data_remote_args",
    "decide",
    "guarded", "job_submit_kwargs", "scaling_config", "serve_options", "site_selector",
    "task_options", "train_label_selectors",
]
