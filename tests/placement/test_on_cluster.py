"""Placement on a real three-site cluster: decisions compile to options Ray actually obeys."""

from __future__ import annotations

import time

import pytest

from hybridray import labels as L
from hybridray.exceptions import PlacementRefused, ResidencyViolation
from hybridray.placement import Workload, data_remote_args, decide, guarded, job_submit_kwargs

pytestmark = pytest.mark.slow


def where_am_i() -> str:
    import ray

    return ray.get_runtime_context().get_node_labels()[L.SITE]


def test_every_node_carries_site_labels_and_resources(hr_cluster):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    sites = {n["Labels"][L.SITE] for n in nodes}
    assert sites == {"onprem", "cloud-a", "cloud-b"}
    for n in nodes:
        labels = n["Labels"]
        site = labels[L.SITE]
        topo_site = hr_cluster.topology.sites[site]
        assert labels[L.SITE_KIND] == topo_site.kind.value
        assert labels[L.MAX_DATA_CLASS] == topo_site.max_data_class.value
        assert labels[L.ZONE] == site
        assert n["Resources"][L.site_resource(site)] == L.SITE_RESOURCE_UNITS
        if labels[L.ROLE] != "head":
            assert n["Resources"]["CPU"] == topo_site.pools[0].cpus
    head = [n for n in nodes if n["Labels"][L.ROLE] == "head"]
    assert len(head) == 1 and head[0]["Resources"].get("CPU", 0) == 0


def test_restricted_task_lands_onprem_every_time(hr_cluster):
    import ray

    wl = Workload(name="restricted-probe", cpus=0.5, data_classes=["restricted"])
    refs = [hr_cluster.run(where_am_i, wl) for _ in range(50)]
    assert ray.get(refs) == ["onprem"] * 50
    records = hr_cluster.audit.read("placement", workload="restricted-probe")
    assert len(records) >= 50 and all(r["sites"] == ["onprem"] for r in records)


def test_restricted_work_without_allowed_capacity_is_refused_before_it_runs(hr_cluster,
                                                                         tmp_path):
    marker = tmp_path / "ran"

    def touch():
        marker.write_text("ran")

    wl = Workload(name="too-big", cpus=4, data_classes=["restricted"])  # onprem has 2 CPUs
    with pytest.raises(PlacementRefused) as e:
        hr_cluster.run(touch, wl)
    assert e.value.rule in ("shape", "capacity") and "onprem" in e.value.fix
    assert not marker.exists()
    refusal = hr_cluster.audit.read("refusal", workload="too-big")[-1]
    assert refusal["data_class"] == "restricted" and refusal["outcome"] == "refused"


def test_a_named_cloud_site_is_refused_for_restricted_data(hr_cluster):
    with pytest.raises(PlacementRefused, match="may hold up to confidential"):
        hr_cluster.run(where_am_i, Workload(cpus=0.5, site="cloud-a",
                                            data_classes=["restricted"]))


def test_burst_to_cloud_when_onprem_is_full(hr_cluster):
    import ray

    class Holder:
        def site(self):
            return where_am_i()

    # Fill on-prem's 2 CPUs with restricted actors, then place burstable internal work.
    holders = [hr_cluster.actor(Holder, Workload(name="hold", cpus=1,
                                                 data_classes=["restricted"]))
               for _ in range(2)]
    try:
        assert ray.get([h.site.remote() for h in holders]) == ["onprem", "onprem"]
        wl = Workload(name="burst", cpus=1, data_classes=["internal"],
                      preference="onprem-first")
        placement = hr_cluster.place(wl)
        assert placement.sites[0] == "onprem"  # the policy still prefers on-prem...
        site = ray.get(hr_cluster.run(where_am_i, wl), timeout=60)
        assert site == "cloud-b"  # ...and Ray's fallback took the next (cheapest) cloud
    finally:
        for h in holders:
            ray.kill(h)


def test_live_capacity_orders_fastest_by_free_units(hr_cluster):
    import ray

    @ray.remote
    class Holder:  # already @ray.remote: Cluster.actor applies the placement's options
        def ready(self):
            return True

    holder = hr_cluster.actor(Holder, Workload(cpus=1, site="cloud-a", burst=False,
                                              data_classes="public"))
    try:
        ray.get(holder.ready.remote())
        deadline = time.time() + 30
        while time.time() < deadline:  # resource views propagate asynchronously
            placement = hr_cluster.place(Workload(cpus=1, preference="fastest",
                                                   data_classes="public"))
            if placement.sites[-1] == "cloud-a":
                break
            time.sleep(0.5)
        assert placement.sites[-1] == "cloud-a"
        assert placement.candidates[-1].units_free == 1
    finally:
        ray.kill(holder)


def test_guard_stops_code_that_bypassed_placement(hr_cluster):
    import ray

    @guarded("restricted")
    def read_secret():
        return "secret"

    # Pinned to cloud-b by hand, bypassing hybridray's placement entirely.
    ref = ray.remote(read_secret).options(
        num_cpus=0.5, label_selector={L.SITE: "cloud-b"}).remote()
    with pytest.raises(ray.exceptions.RayTaskError) as e:
        ray.get(ref)
    assert isinstance(e.value.cause, ResidencyViolation)
    assert "cloud-b" in str(e.value.cause)


def test_guarded_actor_class_checks_its_node_before_init(hr_cluster):
    import ray

    from hybridray.api import _guard_class

    class Vault:
        def __init__(self):
            self.opened = True

        def site(self):
            return where_am_i()

    wl = Workload(cpus=0.5, data_classes=["restricted"])
    bad = ray.remote(_guard_class(Vault, wl.data_class)).options(
        num_cpus=0.5, label_selector={L.SITE: "cloud-a"}).remote()
    with pytest.raises(ray.exceptions.RayActorError) as e:
        ray.get(bad.site.remote())
    assert "may hold up to confidential" in str(e.value)
    good = hr_cluster.actor(Vault, wl)
    try:
        assert ray.get(good.site.remote()) == "onprem"
    finally:
        ray.kill(good)


def test_ray_data_stage_runs_where_the_placement_says(hr_cluster):
    import ray

    placement = decide(hr_cluster.topology, Workload(kind="data", cpus=0.5,
                                                     data_classes=["confidential"],
                                                     site="cloud-a", burst=False))

    def tag(batch):
        batch["site"] = [where_am_i()] * len(batch["id"])
        return batch

    ds = ray.data.range(40, override_num_blocks=4).map_batches(
        tag, **data_remote_args(placement))
    assert {row["site"] for row in ds.take_all()} == {"cloud-a"}


def test_job_entrypoint_runs_on_the_selected_site(hr_cluster, local_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from hybridray.cluster import ray_env

    placement = decide(hr_cluster.topology, Workload(kind="job", cpus=0, site="cloud-b",
                                                     data_classes="public",
                                                     burst=False))
    import ray

    script = tmp_path / "noop.py"
    script.write_text("print('entrypoint ran')\n")
    env = ray_env(local_cluster)
    client = JobSubmissionClient(env["RAY_API_SERVER_ADDRESS"])
    job = client.submit_job(entrypoint=f"python {script.name}",
                            runtime_env={"working_dir": str(tmp_path)},
                            **job_submit_kwargs(placement))
    deadline = time.time() + 120
    while time.time() < deadline and client.get_job_status(job) not in (
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(1)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)
    # On one machine every node shares an IP, so a driver's own "current node" is ambiguous;
    # the job record says which node ran the entrypoint (its supervisor and process).
    node_id = client.get_job_info(job).driver_node_id
    sites = {n["NodeID"]: n["Labels"][L.SITE] for n in ray.nodes()}
    assert sites[node_id] == "cloud-b"
