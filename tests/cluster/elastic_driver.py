"""Driver scenarios for tests/cluster/test_elastic.py, run as a user's script would be.

    python -m tests.cluster.elastic_driver SCENARIO CLUSTER [ARG]

Each prints ``RESULT {json}`` as its last line. A separate process, because the pytest process
may already be the driver of the session's shared cluster.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import hybridray
from hybridray import labels as L
from hybridray.cluster import elastic
from hybridray.cluster.gcs import GcsView
from hybridray.cluster.plan import NODE

KILLED = "killed"   # written to the marker dir once the spot node is killed
STEPS = 24          # the Train run's steps, half a second each


def where(seconds: float = 0.0, marker_dir: str | None = None) -> dict[str, str]:
    """Sleep on whatever node runs this, and say which node it was. With ``marker_dir``,
    say where it started, then run until the driver has killed a node (at most
    ``seconds``): so the task is still running when its node dies."""
    import ray

    labels = ray.get_runtime_context().get_node_labels()
    if marker_dir:
        key = _mark(marker_dir, "task")
        killed = os.path.join(marker_dir, KILLED)
        deadline = time.time() + seconds
        while not os.path.exists(killed) and time.time() < deadline:
            time.sleep(0.2)
        # On the killed node this worker outlives its raylet for a moment and could still
        # hand back a result; keep it busy until Ray's own check ends it.
        while os.path.exists(killed) and open(killed).read() == key and \
                time.time() < deadline:
            time.sleep(0.2)
    else:
        time.sleep(seconds)
    return {"site": labels[L.SITE], "node": labels.get(NODE, "?")}


def _view(cluster) -> dict:
    state = cluster.state
    with GcsView(state.address, state.token_path, state.tls) as gcs:
        return gcs.autoscaling()


def restricted(cluster) -> dict:
    """Four 1-CPU restricted tasks on a 2-CPU on-prem site: two must wait, and the wait must
    not start a cloud node. Waits until Ray's autoscaler has judged the waiting request
    infeasible, then watches it for six more seconds."""
    import ray

    wl = hybridray.Workload(name="restricted-wait", cpus=1, data_classes=["restricted"],
                            preference="onprem-first")
    refs = [cluster.run(where, wl, 8.0) for _ in range(4)]
    deadline = time.time() + 60
    seen = None
    while time.time() < deadline:
        view = _view(cluster)
        hit = [r for r in view["infeasible"]
               if any(s.get(L.SITE) == "in(onprem)" for s in r["selectors"])]
        if hit:
            seen = (view["version"], hit)
            break
        time.sleep(0.5)
    pending, watched = [], 0.0
    if seen:  # keep watching for several more of its rounds (1 s apart in the test)
        start = time.time()
        while time.time() - start < 6:
            view = _view(cluster)
            pending += view["pending_launches"] + view["pending_instances"]
            time.sleep(0.5)
        watched = time.time() - start
    return {"ran": ray.get(refs), "infeasible": seen[1] if seen else None, "watched_s": watched,
            "pending": pending}


def burst(cluster, data_class: str = "confidential") -> dict:
    """Four 1-CPU onprem-first tasks: two fit on-prem, two burst to a cloud Ray adds."""
    import ray

    wl = hybridray.Workload(name=f"burst-{data_class}", cpus=1, data_classes=[data_class],
                            preference="onprem-first")
    placement = cluster.place(wl)
    started = time.time()
    refs = [cluster.run(where, wl, 10.0) for _ in range(4)]
    ran = ray.get(refs, timeout=180)    # each ran under the guard, which checks membership
    members = {m.node_id: {"key": m.key, "how": m.how} for m in cluster.state.members} \
        if cluster.members() is not None else {}
    return {"sites": list(placement.sites), "ran": ran, "members": members,
            "seconds": time.time() - started,
            "selector": hybridray.task_options(placement)["fallback_strategy"][0][
                "label_selector"]}


def _mark(marker_dir: str, what: str) -> str:
    import ray

    key = ray.get_runtime_context().get_node_labels().get(NODE, "?")
    with open(os.path.join(marker_dir, f"{what}@{key}@{os.getpid()}"), "w") as f:
        f.write(key)
    return key


def train_loop(config: dict) -> None:
    """One Train worker: say where it runs, report a step every half second with a
    checkpoint (Ray Train's result carries the metrics of the latest checkpoint), and
    resume from the latest checkpoint when Train restarts it."""
    import tempfile

    import ray.train

    key = _mark(config["marker_dir"], "train")
    first, resumed_from = 0, -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resumed_from = json.loads(open(os.path.join(d, "step.json")).read())["step"]
        first = resumed_from + 1
    for step in range(first, config["steps"]):
        time.sleep(0.5)
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "step.json"), "w") as f:
                json.dump({"step": step}, f)
            ray.train.report({"step": step, "node": key, "resumed_from": resumed_from},
                             checkpoint=ray.train.Checkpoint.from_directory(d))


def spot(cluster, marker_dir: str) -> dict:
    """On-prem held by restricted actors, so internal onprem-first work bursts to the cheapest
    allowed cloud: cloud-b's spot pool. A Serve replica, a Ray Train worker and a task share
    the spot node Ray's autoscaler starts for them; then the node is killed (SIGKILL to its
    raylet, as a reclaimed VM vanishes). Ray retries the task, Serve restarts the replica,
    Train restarts its worker group, and the autoscaler starts the node they need."""
    import threading

    import ray
    import ray.train
    from ray import serve
    from ray.train.torch import TorchTrainer

    from hybridray.placement import compile as C

    @ray.remote
    class Holder:
        def ready(self):
            return True

    holders = [cluster.actor(Holder, hybridray.Workload(name="hold", cpus=1,
                                                        data_classes=["restricted"]))
               for _ in range(2)]
    ray.get([h.ready.remote() for h in holders])
    started = time.time()

    def wl(name: str, cpus: float, kind: str = "task") -> hybridray.Workload:
        return hybridray.Workload(name=name, kind=kind, cpus=cpus, data_classes=["internal"],
                                  preference="onprem-first")

    @serve.deployment
    class Where:
        def __call__(self) -> str:
            return ray.get_runtime_context().get_node_labels().get(NODE, "?")

    serve.start(proxy_location="Disabled")
    replica = cluster.place(wl("spot-replica", 0.5, "serve"))
    handle = serve.run(Where.options(**C.serve_options(replica)).bind(), name="where",
                       route_prefix=None)
    served_before = handle.remote().result(timeout_s=180)
    task_ref = cluster.run(where, wl("spot-task", 1), 240.0, marker_dir)
    placement = cluster.place(wl("spot-train", 0.5, "train"))
    trainer = TorchTrainer(
        train_loop, train_loop_config={"marker_dir": marker_dir, "steps": STEPS},
        scaling_config=C.scaling_config(placement, 1, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(
            name="spot-train", storage_path=os.path.join(marker_dir, "..", "train"),
            failure_config=ray.train.FailureConfig(max_failures=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    killed: dict = {}

    def kill_when_all_three_run_there() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            files = os.listdir(marker_dir)
            train = [f.split("@")[1] for f in files if f.startswith("train@")]
            task = [f.split("@")[1] for f in files if f.startswith("task@")]
            if train and task:
                key = train[0]
                node = next((n for n in elastic.load_nodes(cluster.state.state_dir)
                             if n.key == key), None)
                if node is not None:
                    killed.update(key=key, task=task[0])
                    time.sleep(2)   # a few steps reported
                    os.kill(node.raylet_pid, signal.SIGKILL)
                    killed["at"] = time.time()
                    with open(os.path.join(marker_dir, KILLED), "w") as f:
                        f.write(key)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_all_three_run_there, daemon=True)
    killer.start()
    try:
        result = trainer.fit()
    except Exception as e:  # say what failed, with what the rest saw
        result = type("Failed", (), {"metrics": None, "error": e})()
    train_done = time.time()
    killer.join(timeout=60)
    task_result = ray.get(task_ref, timeout=240)
    served_after, deadline = None, time.time() + 180
    while time.time() < deadline:
        try:
            served_after = handle.remote().result(timeout_s=30)
            if served_after != killed.get("key"):
                break
        except Exception:  # the replica is being restarted
            pass
        time.sleep(1)
    serve.shutdown()
    for h in holders:
        ray.kill(h)
    return {"killed": killed, "served_before": served_before, "served_after": served_after,
            "task": task_result, "train_node": (result.metrics or {}).get("node"),
            "train_steps": (result.metrics or {}).get("step"),
            "train_resumed_from": (result.metrics or {}).get("resumed_from"),
            "train_error": repr(result.error) if result.error else "",
            "seconds": {"killed_at": killed.get("at", 0) - started,
                        "train_done": train_done - started, "end": time.time() - started},
            "markers": sorted(os.listdir(marker_dir))}


def coordinator(cluster) -> dict:
    """What Ray Data does when a pipeline starts and ends: a request of its own through
    Ray's AutoscalingCoordinator, then its cancellation. Each re-sends the merged request to
    the autoscaler at once (the coordinator also does every 20 s); a request that did not go
    through the coordinator is replaced by that merge."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coord = get_or_create_autoscaling_coordinator()
    ray.get(coord.request_resources.remote(requester_id="test-ray-data",
                                           resources=[{"CPU": 1}], expire_after_s=60))
    ray.get(coord.cancel_request.remote("test-ray-data"))
    return {"merged": True}


SCENARIOS = {"restricted": restricted, "burst": burst, "spot": spot,
             "coordinator": coordinator}


def main() -> None:
    scenario, name, *args = sys.argv[1:]
    cluster = hybridray.connect(name)
    result = SCENARIOS[scenario](cluster, *args)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
