"""Defence in depth: a check that runs *inside* a worker before it touches classified data.

Placement already keeps work off nodes that may not hold its data, but labels can be wrong,
a selector can be edited by hand, and user code can be called from anywhere. The guard reads
the labels of the node the code is actually running on and refuses if that node's
``hybridray.io/max-data-class`` is below the data's class (or missing: deny by default), or
if the node is not a recorded member of the cluster (drift: labels are self-asserted, so a
node that joined with the token and on-prem labels would otherwise pass).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

from hybridray import labels as L
from hybridray.exceptions import ResidencyViolation
from hybridray.topology.models import DataClass

F = TypeVar("F", bound=Callable[..., Any])


# The site of *this driver process*, set by ``hybridray.connect`` (``$HYBRIDRAY_SITE``, the
# site a job's entrypoint was placed at, or the head's site for a cluster on this machine).
# A driver is not a worker: Ray gives it the labels of whichever node it attached to (on one
# machine, the head's), so those labels say nothing about where the driver itself runs.
_DRIVER: dict[str, str] = {}

# The placement a guarded task or actor runs under (set in the worker by the guard), so
# ``child_options()`` can give its children the same selectors.
_PARENT: dict[str, Any] = {}


def set_driver_site(site: str | None, max_data_class: DataClass | str | None,
                    cluster: str | None = None) -> None:
    """Record where this driver process runs (``connect`` calls it); None forgets it."""
    _DRIVER.clear()
    if site is not None and max_data_class is not None:
        _DRIVER.update({L.SITE: site, L.MAX_DATA_CLASS: DataClass(max_data_class).value,
                        L.CLUSTER: cluster or ""})


def in_worker() -> bool:
    """True inside a Ray task or actor (not in a driver, not outside Ray)."""
    import ray

    if not ray.is_initialized():
        return False
    return ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def current_node_labels() -> dict[str, str]:
    """Labels of where this code runs: the node's, in a Ray worker; the driver's recorded
    site, in a driver (``{}`` when that is not known: deny by default)."""
    import ray

    if in_worker():
        return dict(ray.get_runtime_context().get_node_labels() or {})
    return dict(_DRIVER)


def may_hold_here(data_class: DataClass | str) -> bool:
    """Whether the node (in a worker) or driver site (in a driver) this code runs on may hold
    ``data_class``: the rule of ``check_residency``, without refusing or auditing (for a
    caller that narrows what it does instead, e.g. ``verify --local``)."""
    limit = current_node_labels().get(L.MAX_DATA_CLASS)
    return limit is not None and DataClass(limit) >= DataClass(data_class)


def check_residency(data_class: DataClass | str,
                    node_labels: dict[str, str] | None = None, *,
                    what: str = "guard") -> str:
    """Raise ``ResidencyViolation`` unless this node may hold ``data_class``; return its site.

    Every violation is written to the cluster's audit log (event ``refusal``, ``what``
    naming the path) before it is raised. In a worker, ``NodeNotMember`` (a
    ``ResidencyViolation``, rule ``drift``) when the node is not a member of the cluster
    (``hybridray.cluster.membership.check_member``, which audits through Ray's KV).
    """
    cls = DataClass(data_class)
    labels = current_node_labels() if node_labels is None else node_labels
    if node_labels is None and in_worker():
        from hybridray.cluster.membership import check_member

        check_member(labels)
    site = labels.get(L.SITE, "<unlabelled node>")
    limit = labels.get(L.MAX_DATA_CLASS)
    error = None
    if limit is None:
        where = "this driver's site is not known" if not in_worker() else \
            f"node at {site} carries no {L.MAX_DATA_CLASS} label"
        error = ResidencyViolation(
            f"{where}, so it may not touch {cls.value} data (deny by default)",
            fix="run the code in work placed by hybridray (cluster.run / to_ray), or in a "
                "driver set HYBRIDRAY_SITE to the site this machine is in before "
                "hybridray.connect(); start nodes with `hybridray up` or the rendered join "
                "scripts, which label them")
    elif DataClass(limit) < cls:
        error = ResidencyViolation(
            f"node at site {site} may hold up to {limit}, but this code touches {cls.value} data",
            fix=f"place the work with hybridray (data_classes=[{cls.value!r}]) so it runs only "
                "where that class is allowed; a child task started from placed work takes "
                "its options from hybridray.child_options()")
    if error is not None:
        audit_violation(error, what=what, site=site, data_class=cls.value, labels=labels)
        raise error
    return site


def audit_violation(error: Exception, **fields: Any) -> None:
    """Append a guard violation to the audit log of the cluster this node belongs to.

    Written where the violation happened, to ``$HYBRIDRAY_HOME/audit/CLUSTER.jsonl`` of that
    host (on one machine: the driver's own log). In a worker it is also queued in Ray's KV
    (``cluster.mirror``) under the same ``rid``, so a violation on another host reaches the
    operator's log at the next ``hybridray status``/``audit`` drain, and one on the operator's
    host is not written twice. Never raises: the refusal itself matters more.
    """
    import contextlib
    import secrets

    from hybridray.audit import AuditLog

    labels = fields.pop("labels", {}) or {}
    cluster = labels.get(L.CLUSTER) or _DRIVER.get(L.CLUSTER) or \
        os.environ.get("HYBRIDRAY_CLUSTER")
    if not cluster:
        return
    worker = in_worker()
    if worker:
        import socket

        fields.update(rid=secrets.token_hex(8), host=socket.gethostname())
    with contextlib.suppress(Exception):
        rec = AuditLog.for_cluster(cluster).refusal(error, worker=worker, cluster=cluster,
                                                    **fields)
        if worker:
            from hybridray.cluster import mirror

            mirror.queue_event(rec.pop("event"), **{k: v for k, v in rec.items()
                                                    if k not in ("ts", "pid")})


def guarded(data_class: DataClass | str, options: dict[str, Any] | None = None
            ) -> Callable[[F], F]:
    """Decorator: run ``check_residency(data_class)`` before every call of the function.

    ``options`` (the compiled Ray options of the placement) become what
    ``child_options()`` returns inside the call.
    """
    cls = DataClass(data_class)

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            check_residency(cls)
            if options is None:
                return fn(*args, **kwargs)
            # Through module-level functions, not the dict itself: this closure is pickled
            # by value into the worker, and would carry a copy of ``_PARENT`` with it.
            saved = enter_parent(cls, options)  # a worker runs many tasks: restore after
            try:
                return fn(*args, **kwargs)
            finally:
                leave_parent(saved)

        return inner  # type: ignore[return-value]

    return wrap


def child_options(**overrides: Any) -> dict[str, Any]:
    """Ray options for a child task or actor of the guarded work running here: the same
    label selector and fallbacks (site, data class, pool, accelerator, market) as the
    parent's placement, with resources from ``overrides`` (``num_cpus=...``).

        @ray.remote
        def child(rows): ...
        ref = child.options(**hybridray.child_options(num_cpus=0.5)).remote(rows)

    Ray itself cannot carry a parent's placement to a plain ``ray.remote`` child: without
    these options the child may start on any node. Raises ``ResidencyViolation`` outside
    work placed by hybridray (there is no placement to inherit).
    """
    if not _PARENT:
        raise ResidencyViolation(
            "child_options() is only known inside work started by Cluster.run/remote/actor",
            fix="start the parent with cluster.run(fn, workload) (or cluster.remote), or pass "
                "C.task_options(placement) of a placement of your own")
    opts = {k: v for k, v in _PARENT["options"].items()
            if k in ("label_selector", "fallback_strategy")}
    opts.update(overrides)
    return opts


def enter_parent(data_class: DataClass | str, options: dict[str, Any]) -> dict[str, Any]:
    """Mark this process as running guarded work (an actor, for its whole life); returns
    what was there before, for ``leave_parent``."""
    saved = dict(_PARENT)
    _PARENT.update(data_class=DataClass(data_class).value, options=options)
    return saved


def leave_parent(saved: dict[str, Any]) -> None:
    _PARENT.clear()
    _PARENT.update(saved)


def parent_class() -> str | None:
    """The data class of the guarded work running here, or None."""
    return _PARENT.get("data_class")
