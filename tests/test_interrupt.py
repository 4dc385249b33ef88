"""Ctrl-C (a real SIGINT) stops hybridray's long commands promptly, brings down what they
started, and exits non-zero; and it stops a test run that trained before.

Each command runs as a user runs it (a subprocess); SIGINT is sent once it is visibly busy.
``up`` and ``demo`` start clusters of their own (own names, own HYBRIDRAY_HOME); ``train``
and ``serve`` run on the session's shared cluster and must leave nothing on it. A hang is a
failure (the waits are bounded); how long the stop took is not asserted (no timing asserts).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.paths import ROOT

pytestmark = [pytest.mark.slow]

FOREIGN_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
               "RAY_API_SERVER_ADDRESS", "HYBRIDRAY_CLUSTER", "HYBRIDRAY_SERVE_TOKENS")
FAST_TRAIN = ["model.block_size=32", "train.micro_batch=8", "train.eval_batches=2",
              "train.warmup_steps=2", "train.max_failures=0", "data.max_files=24",
              "data.shard_files=12", "metrics.progress=false",
              "data.output=onprem:datasets/test-sigint"]


def _env(home: Path, state=None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(HYBRIDRAY_HOME=str(home), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               RAY_USAGE_STATS_ENABLED="0", **extra)
    if state is not None:
        from hybridray.cluster import ray_env

        env.update(ray_env(state))
    return env


def _start(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    """Output up to the first line containing ``marker`` (fails if the process ends first)."""
    seen: list[str] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=1):
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.kill()
    pytest.fail(f"never saw {marker!r}:\n{''.join(seen)[-3000:]}")


def _interrupt(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"still running {timeout:.0f} s after Ctrl-C:\n{out[-3000:]}")
    return proc.returncode, out


def _alive_actors(*classes: str) -> list[str]:
    from ray.util.state import list_actors

    return [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name in classes]


def _gone(check, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not check():
            return True
        time.sleep(1)
    return False


def test_ctrl_c_during_up_stops_every_node_it_started(tmp_path):
    from hybridray.cluster import load_state
    from hybridray.cluster.state import processes_using
    from hybridray.exceptions import ClusterNotFound

    proc = _start([sys.executable, "-m", "hybridray", "up", "clusters/local.yaml",
                   "name=sigint-up", "--no-dashboard", "--timeout", "180"], _env(tmp_path))
    _read_until(proc, "onprem")                  # a node is starting or up
    code, out = _interrupt(proc)
    assert code == 130, out
    assert "interrupted" in out and "Traceback" not in out
    with pytest.raises(ClusterNotFound):
        load_state("sigint-up", home=tmp_path)
    assert _gone(lambda: processes_using(str(tmp_path))), processes_using(str(tmp_path))


def test_ctrl_c_stops_hybridray_train_and_its_workers(local_cluster, hr_cluster,
                                                      hybridray_home):
    proc = _start([sys.executable, "-m", "hybridray", "train", "configs/train/tiny.yaml",
                   "--cluster", local_cluster.name, "--no-progress", "name=sigint-train",
                   "train.steps=100000", *FAST_TRAIN], _env(hybridray_home, local_cluster))
    deadline = time.monotonic() + 300
    while len(_alive_actors("RayTrainWorker")) < 2:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the training never started"
        time.sleep(1)
    code, out = _interrupt(proc)
    assert code == 130, out[-3000:]
    assert "interrupted" in out and "Traceback" not in out
    assert _gone(lambda: _alive_actors("RayTrainWorker", "TrainController")), \
        _alive_actors("RayTrainWorker", "TrainController")


TEST_RUN = '''
import os, time
import hybridray
from hybridray.train.trainer import train

def test_train_first():
    cluster = hybridray.connect(os.environ["HR_CLUSTER"])
    r = train({"name": "sigint-pytest"}, cluster, progress=False,
              overrides=os.environ["HR_OVERRIDES"].split() + ["train.steps=2",
              "train.log_interval=1", "train.checkpoint_interval=2", "train.eval_interval=2"])
    assert r.steps == 2

def test_wait():
    print("WAITING FOR CTRL-C", flush=True)
    time.sleep(600)

def test_never_reached():
    open(os.environ["HR_MARKER"], "w").write("ran")
'''


def test_ctrl_c_stops_a_test_run_that_trained_before(local_cluster, hybridray_home, tmp_path):
    """Ray Train's fit() used to leave its SIGINT handler behind: a later Ctrl-C in the same
    process (make test) went to a finished run and the suite ran on."""
    (tmp_path / "test_run.py").write_text(TEST_RUN)
    marker = tmp_path / "marker"
    proc = _start([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider",
                   "--rootdir", str(tmp_path), str(tmp_path / "test_run.py")],
                  _env(hybridray_home, local_cluster, HR_CLUSTER=local_cluster.name,
                       HR_OVERRIDES=" ".join(FAST_TRAIN), HR_MARKER=str(marker)),
                  cwd=tmp_path)
    _read_until(proc, "WAITING FOR CTRL-C")
    code, out = _interrupt(proc, timeout=120)
    assert code == 2, out[-3000:]                # pytest: interrupted
    assert "KeyboardInterrupt" in out and "1 passed" in out
    assert not marker.exists()


def test_ctrl_c_during_serve_deploy_removes_what_it_started(local_cluster, hr_cluster,
                                                            hybridray_home):
    from ray import serve

    from hybridray.cluster.ports import free_ports

    name = "sigint-serve"
    proc = _start([sys.executable, "-m", "hybridray", "serve", "jobs/configs/serve-embed.yaml",
                   "--cluster", local_cluster.name, f"name={name}",
                   f"http.port={free_ports(1)[0]}", "ingress.replicas=1",
                   "models.0.sites.cloud-b.min_replicas=0"],
                  _env(hybridray_home, local_cluster, HYBRIDRAY_SERVE_TOKENS="t" * 32))
    _read_until(proc, f"{name}: deploying")
    code, out = _interrupt(proc)
    assert code == 130, out[-3000:]
    assert "interrupted" in out and "Traceback" not in out

    def ours() -> list[str]:
        return [a for a in serve.status().applications if a.startswith(name)]

    assert _gone(ours, timeout=120), ours()


def test_ctrl_c_stops_the_demo_and_it_tears_down(tmp_path):
    import json

    from hybridray.cluster.state import processes_using

    out_dir = tmp_path / "report"
    proc = _start([sys.executable, "-m", "hybridray", "demo", "--quick", "--name", "sigint-demo",
                   "--report-dir", str(out_dir)], _env(tmp_path))
    _read_until(proc, "2. prepare")             # up is done: there is a cluster to tear down
    code, out = _interrupt(proc)
    assert code != 0, out[-3000:]
    facts = json.loads((out_dir / "report.json").read_text())
    assert facts["error"].startswith("KeyboardInterrupt")
    assert facts["processes"]["left"] == []
    assert _gone(lambda: processes_using(str(tmp_path))), processes_using(str(tmp_path))


def _running_sync_tasks() -> list[str]:
    from ray.util.state import list_tasks

    return [t.name for t in list_tasks(filters=[("state", "=", "RUNNING")], limit=1000)
            if "encode_batch" in t.name or "write_batch" in t.name or "probe_files" in t.name]


def test_ctrl_c_during_sync_keeps_the_committed_version_and_a_rerun_completes(
        local_cluster, hr_cluster, hybridray_home):
    """``hybridray sync`` interrupted while it moves parts: exits 130 with one line, stops its
    Ray Data pipeline, gives the destination's lease back, commits nothing (the previous
    version stays current and reads as before), records the failure in the audit log; a rerun
    adopts what was staged and commits."""
    import uuid

    import pyarrow.parquet as pq
    import ray
    from ray._private.state import available_resources_per_node

    from hybridray.storage import dataset_store, open_dataset, parse_address, sync_dataset
    from hybridray.storage.manifest import DatasetStore
    from tests.data.conftest import tickets, write_tickets

    free_before = {n: r.get("CPU", 0.0) for n, r in available_resources_per_node().items()}
    name = f"datasets/sigint-{uuid.uuid4().hex[:8]}"
    src = Path(hr_cluster.topology.sites["onprem"].storage.path) / name
    files, rows = 8, 800
    write_tickets(src, files=files, rows=rows, row_group=50)
    args = [f"onprem:{name}", f"cloud-a:{name}"]
    first = sync_dataset(*args, cluster=hr_cluster, data_class="confidential")
    for i in range(files):     # every file changes: a mix of versions would show
        pq.write_table(tickets(rows, start=90_000 + i * rows, seed=50 + i),
                       src / f"part-{i:03d}.parquet", row_group_size=50)
    store = DatasetStore(dataset_store(hr_cluster.topology,
                                       parse_address(f"cloud-a:{name}", hr_cluster.topology)))

    proc = _start([sys.executable, "-m", "hybridray", "sync", *args, "--cluster",
                   local_cluster.name, "--data-class", "confidential", "--part-mb", "0",
                   "--cpus", "2"], _env(hybridray_home, local_cluster))
    _read_until(proc, "wrote _parts/")          # it is moving parts (one at a time)
    code, out = _interrupt(proc)
    assert code == 130, out[-3000:]
    assert "interrupted" in out and "Traceback" not in out
    assert "committed" not in out

    assert store.current().version == first.version          # nothing committed
    assert store._lease_bytes() is None                        # the lease was given back
    old = open_dataset(f"cloud-a:{name}", cluster=hr_cluster).read(["id"]).column("id")
    assert sorted(old.to_pylist()) == list(range(files * rows))
    failed = hr_cluster.audit.read("sync", destination=f"cloud-a:{name}", outcome="failed")
    assert failed and failed[-1]["error"].startswith("KeyboardInterrupt")
    assert _gone(_running_sync_tasks), _running_sync_tasks()   # its pipeline stopped

    rerun = sync_dataset(*args, cluster=hr_cluster, data_class="confidential", part_bytes=0)
    assert rerun.outcome == "committed" and rerun.version == first.version + 1
    assert rerun.parts_adopted >= 1                           # staged parts were kept
    ids = open_dataset(f"cloud-a:{name}", cluster=hr_cluster).read(["id"]).column("id")
    assert sorted(ids.to_pylist()) == list(range(90_000, 90_000 + files * rows))

    def held() -> dict[str, float]:     # CPUs the syncs still hold (Ray reports it late)
        now = available_resources_per_node()
        return {n: cpus - now.get(n, {}).get("CPU", 0.0) for n, cpus in free_before.items()
                if now.get(n, {}).get("CPU", 0.0) < cpus}

    assert ray.is_initialized() and _gone(held), held()   # the next test finds them free
