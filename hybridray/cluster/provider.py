"""The node provider Ray's autoscaler v2 uses for elastic pools of a local cluster.

Ray ships a provider that starts nodes as processes on one machine
(``ray.autoscaler._private.fake_multi_node``: ``FakeMultiNodeProvider``); it keeps what it
started in the autoscaler's memory only, and gives every node Ray's default temp dir. This
subclass changes only what a cluster that others must be able to stop needs:

* each node gets its own temp dir under the cluster's (so two clusters never share sockets,
  and ``down`` finds every process by the cluster's own paths), its pool's memory and object
  store, the site labels plus ``hybridray.io/node``, and a free dashboard-agent port;
* each launch and stop is recorded (``elastic.py``): the node's processes with their start
  times in ``elastic/nodes/SEQ.json``, and ``node-launch``/``node-stop`` in the audit log;
* when Ray terminates a node, the GCS's account of its death (drained when idle, lost,
  preempted) and its time go into the ``node-stop`` record: cost stops when the node did;
* once ``down`` has begun (``elastic/STOP``), it refuses to launch.

The decisions stay Ray's: which node type, how many, when to stop one. This module is loaded
inside Ray's autoscaler process (``provider: {type: external, module: ...}``), never by
hybridray's own commands.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import secrets
import signal
import time
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from hybridray.audit import AuditLog
from hybridray.cluster import elastic
from hybridray.cluster.gcs import node_death
from hybridray.cluster.membership import add_members
from hybridray.cluster.plan import NODE
from hybridray.cluster.ports import free_ports
from hybridray.cluster.state import Member
from hybridray.exceptions import ClusterNotFound
from hybridray.procs import process_start_time

logger = logging.getLogger(__name__)


class LocalElasticProvider(FakeMultiNodeProvider):
    """Ray's local multi-node provider, with per-cluster paths and records hybridray reads."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str):
        super().__init__(provider_config, cluster_name)
        hr = provider_config["hybridray"]
        self._state_dir = hr["state_dir"]
        self._temp_root = hr["temp_dir"]
        self._types: dict[str, dict[str, Any]] = hr["node_types"]
        self._cluster, self._home = hr["cluster"], hr["home"]
        self._audit = AuditLog.for_cluster(hr["cluster"], hr["home"])
        self._gcs = None

    # ---- launching ----------------------------------------------------------------------

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources,
                                               labels):
        resources = copy.deepcopy(resources)
        node_type = tags[TAG_RAY_USER_NODE_TYPE]
        info = self._types[node_type]
        with elastic.launch_lock(self._state_dir):
            self._refuse_if_stopping()
            seq = elastic.next_seq(self._state_dir)
        # A fresh random id, never a counter: nobody can join under an id before it is
        # recorded. It becomes a member before its raylet starts, so no placement made
        # meanwhile counts it as drift, and the guard in its workers admits it.
        node_id = secrets.token_hex(28)
        key = f"{info['site']}.{info['pool']}.{seq}"
        self._membership(add=Member(node_id=node_id, site=info["site"], key=key,
                                    pool=info["pool"], how="autoscaler"))
        try:
            with self.lock, elastic.launch_lock(self._state_dir):
                self._refuse_if_stopping()
                self._launch(node_type, info, tags, resources, labels, seq, node_id, key)
        except BaseException:
            self._membership(remove=node_id)
            raise

    def _refuse_if_stopping(self) -> None:
        if elastic.stopping(self._state_dir):
            raise RuntimeError("the cluster is being brought down (hybridray down); not "
                               "launching")

    def _membership(self, *, add: Member | None = None, remove: str | None = None) -> None:
        """Record a node as a member of the cluster (or drop one) through ``add_members``:
        the record on disk and its copy in Ray's KV, which the workers' guard reads."""
        try:
            add_members(self._cluster, [add] if add else [], remove=[remove] if remove else [],
                        home=self._home, wait=True)
        except ClusterNotFound:
            if add is not None:
                raise RuntimeError(f"cluster {self._cluster!r} is no longer recorded (brought "
                                   "down); not launching") from None
        except Exception as e:
            if add is not None:
                raise
            logger.warning("hybridray: could not drop member %s: %s", remove, e)

    def _launch(self, node_type: str, info: dict[str, Any], tags: dict[str, str],
                resources: dict[str, Any], labels: dict[str, str], seq: int, node_id: str,
                key: str) -> None:
        temp_dir = f"{self._temp_root}/e{seq}"
        node_labels = {**labels, NODE: key}
        agent_port = free_ports(1)[0]
        ray_params = ray._private.parameter.RayParams(
            min_worker_port=0, max_worker_port=0, dashboard_port=None,
            dashboard_agent_listen_port=agent_port,
            num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
            memory=resources.pop("memory", None),
            object_store_memory=resources.pop("object_store_memory", None),
            resources=resources, labels=node_labels, temp_dir=temp_dir,
            redis_address=self._gcs_address, gcs_address=self._gcs_address,
            env_vars={
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id,
                "RAY_CLOUD_INSTANCE_ID": node_id,
                "RAY_NODE_TYPE_NAME": node_type,
                ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(node_labels),
            },
        )
        launched_at = time.time()
        node = ray._private.node.Node(ray_params, head=False, shutdown_at_exit=False,
                                      spawn_reaper=False)
        pids = {}
        for procs in node.all_processes.values():
            for proc in procs:
                started = process_start_time(proc.process.pid)
                if started is not None:
                    pids[str(proc.process.pid)] = started
        raylet = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])
        if raylet:  # the raylet first: its death is the node's
            first = str(raylet[0].process.pid)
            pids = {first: pids.pop(first), **pids} if first in pids else pids
        record = elastic.ElasticNode(
            key=key, seq=seq, node_id=node_id, node_type=node_type, site=info["site"],
            pool=info["pool"], temp_dir=temp_dir, launched_at=launched_at,
            price_per_hour=info["price_per_hour"], cpus=ray_params.num_cpus or 0,
            gpus=int(ray_params.num_gpus or 0), spot=info["spot"], pids=pids)
        elastic.save_node(self._state_dir, record)
        self._audit.record("node-launch", **elastic.node_fields(record),
                           launch_s=round(time.time() - launched_at, 3))
        all_tags = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                    TAG_RAY_NODE_NAME: node_id, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}
        all_tags.update(tags)
        self._nodes[node_id] = {"tags": all_tags, "node": node, "record": record}
        logger.info("hybridray: launched %s (%s) as node %s", key, node_type, node_id)

    # ---- stopping -----------------------------------------------------------------------

    def terminate_node(self, node_id):
        """Ray's decision to stop a node: after it drained an idle one, or found one dead
        (a killed raylet, a reclaimed spot VM), or for its own reasons while it runs. The
        GCS says which, and when the node went down (cost stops there)."""
        with self.lock:
            entry = self._nodes.get(node_id)
            if elastic.stopping(self._state_dir):   # down stops and records every node
                super().terminate_node(node_id)
                return
            reason, ended = self._death(node_id)
            super().terminate_node(node_id)
            record = entry.get("record") if entry else None
            if record is None:
                return
            for pid in record.live_pids():  # whatever outlived the raylet
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            # gone: its id may never run placed work again. Dropped before its record, so
            # whoever sees no record of the node sees no member either
            self._membership(remove=node_id)
            elastic.forget_node(self._state_dir, record.seq)
            ended = ended or time.time()
            self._audit.record("node-stop", **elastic.node_fields(record),
                               reason=reason or "autoscaler", ended_at=round(ended, 6),
                               up_s=round(ended - record.launched_at, 3))
            logger.info("hybridray: %s stopped (%s)", record.key, reason or "autoscaler")

    def _death(self, node_id: str) -> tuple[str | None, float | None]:
        try:
            if self._gcs is None:
                from ray._raylet import GcsClient

                self._gcs = GcsClient(address=self._gcs_address)
            return node_death(self._gcs, node_id)
        except Exception as e:  # the record matters more than the reason
            logger.warning("hybridray: cannot read why node %s stopped: %s", node_id, e)
            return None, None
