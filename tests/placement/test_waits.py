"""No silent waits, on the shared cluster: work that can never fit beside what holds a site
is refused up front (capacity rule) naming the holder; work that asks to queue is reported
while it waits, with what holds the site, and given up at its deadline with the fix.

An actor of this module holds part of onprem's 2 CPUs (as a Serve replica would); it is
killed after each test, so the shared cluster is left as found.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from hybridray.exceptions import PlacementRefused, ResourceWaitTimeout
from hybridray.placement import Workload
from tests.paths import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture
def hold_onprem(hr_cluster):
    """Hold ``cpus`` of onprem's CPUs with an actor, as a Serve replica would."""
    import ray

    held = []

    class CpuHolder:   # defined here, so Ray ships it by value
        def ping(self) -> str:
            return "held"

    def hold(cpus: float):
        holder = ray.remote(CpuHolder).options(
            num_cpus=cpus, label_selector={"hybridray.io/site": "onprem"}).remote()
        assert ray.get(holder.ping.remote(), timeout=60) == "held"
        held.append(holder)
        return holder

    free = ray.available_resources().get("CPU", 0)
    yield hold
    for holder in held:
        ray.kill(holder)
    # ray.kill returns before the raylet has the CPUs back: the next test (a placement that
    # reads capacity) must find the site as it was, not still held.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.2)


def test_work_that_can_never_fit_beside_a_holder_is_refused_naming_it(hr_cluster,
                                                                      hold_onprem):
    hold_onprem(1.25)
    group = Workload(name="two-workers", kind="train", count=2, cpus=1,
                     data_classes=["restricted"])
    with pytest.raises(PlacementRefused) as e:   # a fresh reading: the holder started just now
        hr_cluster.place(group, max_age_s=0).raise_if_refused()
    assert e.value.rule == "capacity"
    assert "2 units of 1 CPU can never start at onprem" in e.value.message
    assert "held by actor CpuHolder" in e.value.message and "0.75 of 2 CPUs free" in \
        e.value.message
    assert "stop actor CpuHolder" in e.value.fix and "queue" in e.value.fix
    refusal = hr_cluster.audit.read("refusal", workload="two-workers")[-1]
    assert refusal["rule"] == "capacity"

    one_cpu_task = Workload(name="one-cpu", cpus=1, data_classes=["restricted"])
    assert not hr_cluster.place(one_cpu_task).ok               # 0.75 free, and it lasts
    assert hr_cluster.place(Workload(name="half", cpus=0.5, data_classes=["restricted"])).ok
    assert hr_cluster.place(Workload(**{**group.model_dump(), "queue": True})).ok  # queues
    # internal data may burst: the clouds still have room, so nothing is refused
    assert hr_cluster.place(Workload(**{**group.model_dump(),
                                        "data_classes": ["internal"]})).ok


def test_a_queued_task_is_reported_with_its_holder_then_given_up(hr_cluster, hold_onprem):
    import ray

    from hybridray.waiting import waiting

    hold_onprem(1.25)
    lines: list[str] = []
    queued = Workload(name="queued", cpus=1, data_classes=["restricted"], queue=True)

    def one() -> int:
        return 1

    ref = hr_cluster.run(one, queued)
    with pytest.raises(ResourceWaitTimeout) as e, \
            waiting("score tickets", timeout=6, say=lines.append, every_s=2):
        ray.get(ref)
    ray.cancel(ref)
    assert lines, "nothing was reported while the task waited"
    assert lines[0].startswith("score tickets: waiting ")
    assert "task one (1 CPU at onprem)" in lines[0]
    assert "held by actor CpuHolder" in lines[0] and "giving up in" in lines[0]
    text = str(e.value)
    assert text.startswith("score tickets: gave up after waiting")
    assert "stop actor CpuHolder" in text and "--wait-timeout" in text


def test_train_cli_queues_reports_and_gives_up_then_leaves_nothing_waiting(
        local_cluster, hr_cluster, hold_onprem):
    """The workers of a queued run cannot start beside the holder (1.25 CPUs free, 2
    needed); the corpus task (1 CPU) can. The CLI reports, gives up, stops the run."""
    import ray
    from ray.util.state import list_placement_groups

    from hybridray.cluster import ray_env

    hold_onprem(0.75)
    proc = subprocess.run(
        [sys.executable, "-m", "hybridray", "train", "configs/train/tiny.yaml",
         "name=queued-run", "train.steps=2", "data.max_files=12", "data.shard_files=6",
         "data.output=onprem:datasets/test-queued", "--cluster", local_cluster.name,
         "--queue", "--new-run", "--wait-timeout", "8", "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, **ray_env(local_cluster)})
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    waits = [x for x in err.splitlines() if ": workers: waiting " in x]
    assert waits, err[-3000:]
    assert "placement group of 2 bundle(s) for RayTrainWorker" in waits[0] or \
        "placement group of 2 bundle(s) (2 CPU at onprem)" in waits[0]
    assert "onprem: 1.25 of 2 CPUs free, held by actor CpuHolder" in waits[0]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: train queued-run-") and "gave up after waiting" in last
    assert "Traceback" not in err
    # the run was stopped: no placement group of it is left pending
    pending = [g for g in list_placement_groups(detail=True, raise_on_missing_output=False)
               if g.state in ("PENDING", "RESCHEDULING")]
    assert pending == [], pending
    assert ray.is_initialized()


def test_a_queued_run_given_up_in_a_driver_that_lives_on_leaves_no_group_behind(
        hr_cluster, hold_onprem, monkeypatch):
    """The CLI's exit ends its job, and Ray then frees what the job's actors held; a Python
    driver (a notebook, a service) lives on after ``train`` gives up. The controller was
    killed at the deadline while its group was pending; the group must not stay pending and
    take the CPUs once the holder lets go."""
    import ray
    from ray.util.state import list_placement_groups

    from hybridray.train.trainer import train
    from hybridray.waiting import WAIT_TIMEOUT_ENV

    def pending() -> list[str]:
        return [g.placement_group_id for g in list_placement_groups(
            detail=True, raise_on_missing_output=False)
            if g.state in ("PENDING", "RESCHEDULING")]

    before = pending()
    holder = hold_onprem(0.75)
    monkeypatch.setenv(WAIT_TIMEOUT_ENV, "8")
    with pytest.raises(ResourceWaitTimeout, match="gave up after waiting"):
        train("configs/train/tiny.yaml", hr_cluster, progress=False, overrides=[
            "name=queued-in-driver", "train.steps=2", "train.queue=true",
            "data.max_files=12", "data.shard_files=6",
            "data.output=onprem:datasets/test-queued-driver", "train.resume=never"])
    assert ray.is_initialized()
    assert pending() == before
    ray.kill(holder)      # the CPUs free up: nothing of the given-up run takes them
    time.sleep(2)
    assert pending() == before
    free = ray.available_resources().get("CPU", 0)
    assert free >= ray.cluster_resources().get("CPU", 0) - 0.5, ray.available_resources()


def test_submit_reports_an_entrypoint_waiting_for_cpus_then_stops_the_job(
        local_cluster, hr_cluster, hold_onprem):
    """A job entrypoint asking for 1.5 CPUs at onprem, where 1.25 are held: submit says
    what it waits for and what holds it, ends the job at the deadline, exits 2."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from hybridray.cluster import ray_env

    hold_onprem(1.25)
    proc = subprocess.run(
        [sys.executable, "-m", "hybridray", "submit", "--cluster", local_cluster.name,
         "--site", "onprem", "--data-class", "public", "--cpus", "1.5",
         "--wait-timeout", "8", "--", "python", "-c", "print('ran')"],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
        env={**os.environ, **ray_env(local_cluster)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    waits = [x for x in out.splitlines() if x.startswith("job ") and ": waiting " in x]
    assert waits, out[-3000:]
    assert "1.5 CPU at onprem" in waits[0], waits[0]
    assert "onprem: 0.75 of 2 CPUs free, held by actor CpuHolder" in waits[0], waits[0]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: job ") and "gave up after waiting" in last, last
    assert "stop actor CpuHolder" in last and "Traceback" not in out
    # the job was ended, not left to start once the CPUs are free
    job_id = last.split()[2].rstrip(":")
    client = JobSubmissionClient(local_cluster.dashboard_url)
    deadline = time.monotonic() + 60
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    assert client.get_job_status(job_id) in (JobStatus.FAILED, JobStatus.STOPPED)
    assert "ran" not in client.get_job_logs(job_id)
