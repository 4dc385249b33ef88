"""A recorded cluster that is not running, for tests of status, activity and metrics.

Its head's pid is this process with a start time that cannot match (so the head counts as
gone and no GCS is asked), and its cloud-a node is this very process (so it counts as
running); the audit log holds two transfers, a placement, a refusal and a running training.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.paths import CLUSTERS


def make_recorded(home: Path, name: str = "m1") -> Path:
    from hybridray.audit import AuditLog
    from hybridray.cluster.state import (
        ClusterState,
        NodeRecord,
        now_iso,
        process_start_time,
        save_state,
    )
    from hybridray.topology import load_topology

    topology = load_topology(CLUSTERS / "local.yaml", [f"name={name}"])
    me = os.getpid()
    nodes = [NodeRecord(key="head", site="onprem", pool=None, role="head", index=0, pid=me,
                        pgid=me, start_time=-1, log="", cpus=0, price_per_hour=0.4),
             NodeRecord(key="cloud-a/cpu/0", site="cloud-a", pool="cpu", role="worker",
                        index=0, pid=me, pgid=me, start_time=process_start_time(me), log="",
                        cpus=2, price_per_hour=0.34)]
    state = ClusterState(name=name, address="127.0.0.1:1", token_path=str(home / "t"),
                         temp_dir=str(home / "ray"), home=str(home), dashboard=False,
                         topology_snapshot=topology.model_dump(mode="json"),
                         created_at=now_iso(), nodes=nodes)
    state.state_dir.mkdir(parents=True)
    save_state(state)
    audit = AuditLog.for_cluster(name, home)
    audit.transfer("cloud-b", "onprem", 2_000_000_000, 0.24, what="dataset sync")
    audit.transfer("cloud-b", "onprem", 1_000_000_000, 0.12, what="dataset sync")
    audit.record("placement", workload="w", kind="train", sites=["onprem", "cloud-a"],
                 data_class="internal")
    audit.record("refusal", workload="r", kind="data", rule="residency", message="no")
    audit.record("train-start", run="r1", sites=["onprem"], data_class="restricted")
    audit.record("placement", workload="embed", kind="serve", sites=["cloud-a"],
                 source="serve", service="embed", data_class="public")
    audit.record("sync", source="onprem:t", destination="cloud-a:t", outcome="committed",
                 bytes_moved=1234)
    return home
