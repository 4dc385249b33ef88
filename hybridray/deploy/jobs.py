"""Submit a job whose driver (the entrypoint) runs where the placement policy says.

The policy decides (``decide`` with ``kind="job"``), the compiler turns the decision into
``entrypoint_label_selector`` (``job_submit_kwargs``), the decision is written to the audit
log, and Ray's Jobs API starts the entrypoint on a node that matches. With ``wait``, the job
record's driver node is looked up afterwards, so the caller sees where it really ran.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from hybridray.exceptions import ClusterError, ConfigError
from hybridray.waiting import FIRST_REPORT_S


@dataclass
class Submitted:
    job_id: str
    site: str                 # the site the policy chose first
    status: str               # Ray's JobStatus name, or PENDING without wait
    ran_at: str | None = None  # the site of the node that ran the entrypoint (with wait)


def submit(cluster: str, entrypoint: list[str], *, site: str | None = None,
           data_classes: list[str] | tuple[str, ...] = (), prefer: str | None = None,
           cpus: float = 0.0, working_dir: str | None = ".", wait: bool = True,
           timeout: float = 600.0, home: str | None = None,
           say: Callable[[str], None] = lambda line: None) -> Submitted:
    """Place and submit ``entrypoint`` on running cluster ``cluster``.

    Raises:
        PlacementRefused: no site may run it (the audit log records the refusal).
        ClusterError: the cluster runs without a dashboard (no Jobs API), or the job did
            not finish within ``timeout``.
    """
    import shlex

    from pydantic import ValidationError

    from hybridray.audit import AuditLog
    from hybridray.cluster import apply_env, load_state, ray_env
    from hybridray.placement import Capacity, Workload, decide, job_submit_kwargs

    state = load_state(cluster, home=home)
    if not state.dashboard_url:
        raise ClusterError(f"cluster {cluster!r} runs without a dashboard, so it has no Jobs "
                           "API; bring it up again without --no-dashboard")
    topology = state.topology()
    fields = {"name": f"job:{entrypoint[-1]}"[:64], "kind": "job", "cpus": cpus,
              "data_classes": tuple(data_classes), "site": site}
    if prefer or site:
        fields["preference"] = prefer or "site"
    try:
        workload = Workload(**fields)
    except ValidationError as e:
        raise ConfigError([f"submit: {'.'.join(map(str, err['loc']))}: {err['msg']}"
                           for err in e.errors(include_url=False)]) from None
    avoid = _drift(state, topology)   # the entrypoint's selector keeps off drift nodes
    placement = decide(topology, workload, Capacity.from_topology(topology, avoid=avoid))
    audit = AuditLog.for_cluster(topology.name, home)
    audit.placement(placement, cluster=topology.name, source="submit")
    if avoid:
        audit.record("drift", cluster=topology.name, action="excluded",
                     workload=workload.name,
                     nodes=[{"node_id": k, "reasons": v} for k, v in avoid.items()])
    placement.raise_if_refused()
    kwargs = job_submit_kwargs(placement)
    apply_env(ray_env(state))
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(state.dashboard_url)
    # the entrypoint's hybridray.connect() finds the cluster by name (on a node without the
    # operator's files, in the record's copy in Ray's KV)
    runtime_env = {"env_vars": {"HYBRIDRAY_CLUSTER": state.name}}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    submission_id = f"hybridray-{uuid.uuid4().hex[:16]}"
    _share_driver_log(state, submission_id)
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env,
                               submission_id=submission_id, **kwargs)
    chosen = placement.candidates[0].site
    say(f"submitted {job_id}: entrypoint placed at {chosen} "
        f"(selector {kwargs['entrypoint_label_selector']})")
    result = Submitted(job_id=job_id, site=chosen, status="PENDING")
    if not wait:
        return result
    deadline = time.monotonic() + timeout
    done = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    status = client.get_job_status(job_id)
    pending_since, watch = time.monotonic(), None
    with contextlib.ExitStack() as report:
        while status not in done and not (watch and watch.gave_up):
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} still {status.name} after {timeout:.0f}s; "
                                   f"follow it with: ray job logs -f {job_id}")
            # Only an entrypoint still pending after a few seconds is reported (that needs a
            # Ray driver here); one that starts at once needs only the dashboard's Jobs API,
            # so submit works from any machine that reaches it (an attached cluster).
            if watch is None and status == JobStatus.PENDING and \
                    time.monotonic() - pending_since >= FIRST_REPORT_S:
                watch = report.enter_context(_pending_report(cluster, home, job_id, client,
                                                             say))
            time.sleep(1)
            status = client.get_job_status(job_id)
    result.status = status.name
    result.ran_at = _driver_site(client.get_job_info(job_id).driver_node_id, state)
    say(client.get_job_logs(job_id).rstrip())
    say(f"job {job_id} {status.name}; its entrypoint ran at site {result.ran_at}")
    return result


def _share_driver_log(state, submission_id: str) -> None:
    """Make a job's output readable where Ray's job API reads it, on a one-host cluster.

    Ray's job supervisor writes the entrypoint's output to ``job-driver-ID.log`` in the logs
    directory of the node it runs on; the dashboard agents read it from the directory of the
    node *they* attached to, which, when several nodes share one host (``hybridray up``),
    is the head's. A job placed at another site then showed no output in ``ray job logs``
    nor in ``hybridray submit``. Linking each other node's file name to the head's, before
    the job exists, sends the output where both read it. Nodes on their own hosts (real
    deployments) need nothing: every node uses the same path there.
    """
    from pathlib import Path

    head = next((n for n in state.nodes if n.role == "head"), None)
    if head is None or not head.temp_dir:
        return
    target = Path(head.temp_dir) / "session_latest" / "logs" / f"job-driver-{submission_id}.log"
    if not target.parent.is_dir():
        return
    for node in state.nodes:
        logs = Path(node.temp_dir) / "session_latest" / "logs" if node.temp_dir else None
        if node is head or logs is None or not logs.is_dir() or \
                logs.resolve() == target.parent.resolve():
            continue
        link = logs / target.name
        if not link.exists():
            link.symlink_to(target)


def _drift(state, topology) -> dict[str, str]:
    """Live nodes that are not members of the cluster (or claim more than their site may
    hold): node id -> why."""
    from hybridray.cluster.gcs import GcsView
    from hybridray.cluster.membership import effective_members, find_drift

    with GcsView(state.address, state.token_path, state.tls) as gcs:
        nodes = gcs.nodes()
    return {d.node_id: d.why
            for d in find_drift(topology, effective_members(state, nodes), nodes)}


def _pending_report(cluster: str, home: str | None, job_id: str, client,
                    say: Callable[[str], None]):
    """While the entrypoint waits for a node (its site's node down, its CPUs held), say what
    holds it; at ``$HYBRIDRAY_WAIT_TIMEOUT_S`` stop the job and raise ``ResourceWaitTimeout``.
    The entrypoint runs in Ray's job supervisor actor, named after the job."""
    import ray

    from hybridray.api import connect
    from hybridray.waiting import waiting

    if not ray.is_initialized():
        connect(cluster, home=home)

    def stop() -> None:
        # Ray's stop_job only queues a stop call on the supervisor actor: one that is still
        # waiting to be created would start the entrypoint once CPUs free up, and the job
        # would stay PENDING meanwhile. Kill the pending actor (Ray then fails the job).
        from ray.dashboard.modules.job.common import (
            JOB_ACTOR_NAME_TEMPLATE,
            SUPERVISOR_ACTOR_RAY_NAMESPACE,
        )

        with contextlib.suppress(ValueError):   # gone already
            ray.kill(ray.get_actor(JOB_ACTOR_NAME_TEMPLATE.format(job_id=job_id),
                                   namespace=SUPERVISOR_ACTOR_RAY_NAMESPACE), no_restart=True)
        client.stop_job(job_id)

    return waiting(f"job {job_id}", say=say, match=lambda d: job_id in d.key, stop=stop)


def _driver_site(node_id: str | None, state) -> str | None:
    from hybridray.cluster.gcs import GcsView

    if not node_id:
        return None
    with GcsView(state.address, state.token_path, state.tls) as gcs:
        for node in gcs.nodes():
            if node.node_id == node_id:
                return node.labels.get("hybridray.io/site")
    return None
