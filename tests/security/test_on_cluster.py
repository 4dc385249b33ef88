"""The enforcement boundary, attacked on the real local cluster (docs/security.md, one test
per row): each attack is refused with its rule and fix, and each refusal is in the audit log.

Shares the session cluster (``hr_cluster``); nothing here kills or relabels its nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import hybridray
from hybridray import labels as L
from hybridray.exceptions import (
    DataError,
    IntegrityError,
    MaskingError,
    PlacementRefused,
    ResidencyViolation,
)
from hybridray.placement import Workload, data_remote_args, decide, task_options
from hybridray.placement.decision import Placement
from hybridray.storage import open_dataset, sync_dataset, verify_dataset

pytestmark = pytest.mark.slow

ROWS = 40
FULL_MASK = {"output_class": "internal",
             "columns": {"id": "keep", "name": "hash", "email": "hash", "ssn": "drop",
                         "diagnosis": "drop"}}


def where_am_i() -> str:
    import ray

    return ray.get_runtime_context().get_node_labels()[L.SITE]


def _patients() -> pa.Table:
    return pa.table({
        "id": list(range(ROWS)),
        "name": [f"Patient {i}" for i in range(ROWS)],
        "email": [f"p{i}@clinic.example.org" for i in range(ROWS)],
        "ssn": [f"{100 + i:03d}-45-{6789 - i:04d}" for i in range(ROWS)],
        "diagnosis": ["J45.909 asthma" if i % 2 else "E11.9 diabetes" for i in range(ROWS)],
    })


def _onprem_root(cluster) -> Path:
    return Path(cluster.topology.sites["onprem"].storage.path)


@pytest.fixture(scope="module")
def raw(hr_cluster) -> str:
    """A plain directory of restricted rows at onprem (no manifest): ``onprem:PATH``."""
    path = f"raw/patients-{uuid.uuid4().hex[:8]}"
    root = _onprem_root(hr_cluster) / path
    root.mkdir(parents=True)
    pq.write_table(_patients(), root / "part-000.parquet")
    return path


@pytest.fixture(scope="module")
def patients(hr_cluster, raw) -> str:
    """The same rows committed as a restricted hybridray dataset at onprem."""
    address = f"onprem:datasets/{raw.split('/')[-1]}"
    sync_dataset(f"onprem:{raw}", address, cluster=hr_cluster, data_class="restricted")
    return address


def _refusals(cluster, **match) -> list[dict]:
    return cluster.audit.read("refusal", **match)


# ---- tasks, actors: compiled selectors + the guard ------------------------------------------

def test_decided_market_holds_even_when_a_spot_site_is_listed_first(hr_cluster):
    """Item 1 on Ray itself: an on-demand decision forged to list spot cloud-b first still
    starts at cloud-a, because the market is in every compiled selector."""
    import ray

    wl = Workload(name="on-demand", cpus=0.5, spot_ok=False, data_classes="internal",
                  site="cloud-a", burst=False)
    real = decide(hr_cluster.topology, wl)
    assert real.sites == ["cloud-a"] and "cloud-b" in real.excluded
    forged = Placement(real.workload, candidates=(real.primary._replace(site="cloud-b"),
                                                  real.primary))
    opts = task_options(forged)
    assert opts["label_selector"][L.MARKET_TYPE] == "on-demand"
    sites = ray.get([ray.remote(where_am_i).options(**opts).remote() for _ in range(4)])
    assert sites == ["cloud-a"] * 4


def test_already_remote_functions_and_classes_are_guarded(hr_cluster, monkeypatch):
    """Item 3: ``@ray.remote`` work through Cluster.remote/run/actor is wrapped by the
    guard; with a hand-edited selector that sends it to cloud-b the guard refuses in the
    worker, and the violation is audited."""
    import ray

    from hybridray import api

    @ray.remote(num_cpus=0.5, max_retries=0)
    def probe():
        return where_am_i()

    @ray.remote(num_cpus=0.5)
    class Vault:
        def site(self):
            return where_am_i()

    wl = Workload(name="vault", cpus=0.5, data_classes="restricted")
    assert ray.get(hr_cluster.run(probe, wl)) == "onprem"
    vault = hr_cluster.actor(Vault, wl)
    assert ray.get(vault.site.remote()) == "onprem"
    ray.kill(vault)

    before = len(_refusals(hr_cluster, what="guard"))
    forged = {"num_cpus": 0.5, "label_selector": {L.SITE: "cloud-b"}}
    monkeypatch.setattr(api.C, "task_options", lambda placement: forged)
    with pytest.raises(Exception, match="may hold up to internal") as e:
        ray.get(hr_cluster.run(probe, wl))
    assert isinstance(e.value, ResidencyViolation) or "ResidencyViolation" in str(e.value)
    bad = hr_cluster.actor(Vault, wl)
    with pytest.raises(ray.exceptions.RayActorError, match="may hold up to internal"):
        ray.get(bad.site.remote())
    got = _refusals(hr_cluster, what="guard")[before:]
    assert {r["site"] for r in got} == {"cloud-b"} and len(got) >= 2
    assert all(r["rule"] == "residency" and r["worker"] and "fix" in r for r in got)


def test_children_get_the_parents_placement_and_plain_ones_are_caught(hr_cluster, patients):
    """Nested tasks: ``child_options()`` keeps a child where its parent was placed; a plain
    child sent to a cloud that reads hybridray data is refused by the guard, audited."""
    import ray

    topology = hr_cluster.topology

    def read_rows(address, topo):
        from hybridray.storage import open_dataset

        return open_dataset(address, topology=topo).read().num_rows

    def parent(address, topo):
        import ray

        child = ray.remote(where_am_i)
        here = ray.get([child.options(**hybridray.child_options(num_cpus=0.25)).remote()
                        for _ in range(3)])
        reader = ray.remote(read_rows).options(num_cpus=0.25, max_retries=0,
                                               label_selector={L.SITE: "cloud-a"})
        try:
            ray.get(reader.remote(address, topo))
            caught = None
        except Exception as e:  # noqa: BLE001  (the child's refusal, as the parent sees it)
            caught = str(e)
        return here, caught

    wl = Workload(name="parent", cpus=0.5, data_classes="restricted")
    here, caught = ray.get(hr_cluster.run(parent, wl, patients, topology))
    assert here == ["onprem"] * 3
    assert caught and "node at site cloud-a may hold up to confidential" in caught
    assert "child_options" in caught  # the fix names the helper
    got = [r for r in _refusals(hr_cluster) if r.get("site") == "cloud-a"
           and r.get("what") in ("dataset read", "guard")]
    assert got, "the child's refusal is not in the audit log"
    with pytest.raises(ResidencyViolation, match="only known inside work"):
        hybridray.child_options()


# ---- dataset reads ----------------------------------------------------------------------------

def test_dataset_reads_are_placed_and_guarded_by_the_manifests_class(hr_cluster, patients):
    from hybridray.placement.guard import set_driver_site

    ds = open_dataset(patients, cluster=hr_cluster)
    assert ds.data_class == "restricted"
    assert ds.to_ray().count() == ROWS  # placed by class: read tasks at onprem only
    placed = hr_cluster.audit.read("placement", workload=f"read {patients}")
    assert placed and placed[-1]["sites"] == ["onprem"]

    cloud = hr_cluster.place(Workload(name="cheap", kind="data", data_classes="internal",
                                      site="cloud-b", burst=False))
    with pytest.raises(ResidencyViolation, match="admits nodes that may not hold restricted"):
        ds.to_ray(**data_remote_args(cloud))
    assert _refusals(hr_cluster, what="dataset read")[-1]["dataset"] == patients

    set_driver_site("cloud-b", "internal", hr_cluster.name)  # a driver at cloud-b
    try:
        with pytest.raises(ResidencyViolation, match="site cloud-b may hold up to internal"):
            ds.read()
        assert ds.read(override="incident 7: operator reads on the bastion").num_rows == ROWS
    finally:
        set_driver_site("onprem", "restricted", hr_cluster.name)
    override = hr_cluster.audit.read("override")[-1]
    assert override["reason"].startswith("incident 7") and override["dataset"] == patients
    assert ds.read().num_rows == ROWS  # at onprem, where restricted may be held


def test_a_hand_edited_manifest_is_refused_by_readers_and_sync(hr_cluster, raw):
    address = f"onprem:datasets/edited-{uuid.uuid4().hex[:6]}"
    sync_dataset(f"onprem:{raw}", address, cluster=hr_cluster, data_class="restricted")
    root = _onprem_root(hr_cluster) / address.split(":", 1)[1]
    cur = json.loads((root / "_CURRENT").read_text())
    body = json.loads((root / cur["manifest"]).read_text())
    body["data_class"] = "public"
    raw_bytes = json.dumps(body).encode()
    (root / cur["manifest"]).write_bytes(raw_bytes)
    cur["manifest_sha256"] = hashlib.sha256(raw_bytes).hexdigest()
    (root / "_CURRENT").write_text(json.dumps(cur))
    with pytest.raises(IntegrityError, match="signature does not match"):
        open_dataset(address, cluster=hr_cluster)
    dest = f"cloud-b:datasets/edited-{uuid.uuid4().hex[:6]}"
    with pytest.raises(IntegrityError, match="signature does not match"):
        sync_dataset(address, dest, cluster=hr_cluster)
    failed = hr_cluster.audit.read("sync", destination=dest)[-1]
    assert failed["outcome"] == "failed" and "signature" in failed["error"]


def test_decryption_keys_come_alive_only_where_their_class_may_be_held(hr_cluster, raw):
    """Keys travel in task arguments; a key ring unpickled in a worker at a site that may not
    hold its data's class refuses to come alive (audited), and a real dataset's keys carry
    its class, so its placed reads decrypt where they may."""
    import ray

    from hybridray.storage.encryption import key_ring
    from hybridray.storage.secrets import ClusterSecrets

    def holds(ring):
        return where_am_i(), sorted(ring.keys)

    def at(site):
        return ray.remote(holds).options(num_cpus=0.25, max_retries=0,
                                         label_selector={L.SITE: site})

    secrets = ClusterSecrets(hr_cluster.name, hr_cluster.state.home)
    ring = key_ring(secrets, footer_site="cloud-b", data_class="restricted")
    assert ray.get(at("onprem").remote(ring)) == ("onprem", [ring.footer_key])
    before = len(_refusals(hr_cluster, what="decryption keys"))
    with pytest.raises(Exception, match="may hold up to internal"):
        ray.get(at("cloud-b").remote(ring))
    got = _refusals(hr_cluster, what="decryption keys")[before:]
    assert [(r["site"], r["data_class"], r["rule"]) for r in got] == [
        ("cloud-b", "restricted", "residency")]
    # an encrypted (internal) copy at cloud-b: its key ring says internal and its placed
    # reads decrypt it, every one of them on a node that may hold internal
    dest = f"cloud-b:datasets/keys-{uuid.uuid4().hex[:6]}"
    sync_dataset(f"onprem:{raw}", dest, cluster=hr_cluster, data_class="restricted",
                 mask=FULL_MASK)
    ds = open_dataset(dest, cluster=hr_cluster)
    assert ds.manifest.encryption and ds.keys.data_class == "internal"
    assert ds.to_ray().count() == ROWS
    assert len(_refusals(hr_cluster, what="decryption keys")) == before + 1


def test_a_local_verify_opens_no_page_where_the_class_may_not_be_held(hr_cluster, raw):
    """``verify --local`` in a driver at a site below the class: ``full`` (decoding pages)
    is refused and audited; the plain check compares sha256 and size only, and still
    catches a flipped byte."""
    from hybridray.placement.guard import set_driver_site

    address = f"onprem:datasets/lv-{uuid.uuid4().hex[:6]}"
    sync_dataset(f"onprem:{raw}", address, cluster=hr_cluster, data_class="restricted")
    full = verify_dataset(address, cluster=hr_cluster, local=True, full=True)
    assert full.ok and full.checked.endswith("pages") and full.site == "this process"
    set_driver_site("cloud-b", "internal", hr_cluster.name)   # a driver at cloud-b
    try:
        with pytest.raises(ResidencyViolation, match="site cloud-b may hold up to internal"):
            verify_dataset(address, cluster=hr_cluster, local=True, full=True)
        assert _refusals(hr_cluster, what="dataset read")[-1]["dataset"] == address
        report = verify_dataset(address, cluster=hr_cluster, local=True)
        assert report.ok and report.checked == "sha256, size"
        root = _onprem_root(hr_cluster) / address.split(":", 1)[1]
        part = root / open_dataset(address, cluster=hr_cluster).manifest.parts[0].path
        blob = bytearray(part.read_bytes())
        blob[50] ^= 0xFF
        part.write_bytes(bytes(blob))
        with pytest.raises(IntegrityError, match="sha256"):
            verify_dataset(address, cluster=hr_cluster, local=True)
    finally:
        set_driver_site("onprem", "restricted", hr_cluster.name)
    assert hr_cluster.audit.read("verify", address=address)[-1]["checked"] == "sha256, size"


def test_a_guard_violation_on_another_host_reaches_the_operators_log_once(hr_cluster, tmp_path):
    """A worker writes its violation to its own host's log and queues it in Ray's KV; the
    next drain (``hybridray audit``/``status``) brings one on another host into the
    operator's log, and does not repeat one the operator's host already holds."""
    import ray

    from hybridray.audit import AuditLog
    from hybridray.cluster import mirror

    def touch():
        from hybridray.placement.guard import check_residency

        check_residency("restricted", what="guard")

    other = tmp_path / "other-host-home"   # the HYBRIDRAY_HOME of a host elsewhere
    opts = dict(num_cpus=0.25, max_retries=0, label_selector={L.SITE: "cloud-b"})
    for env in ({"HYBRIDRAY_HOME": str(other)}, {}):
        with pytest.raises(Exception, match="may hold up to internal"):
            ray.get(ray.remote(touch).options(**opts, runtime_env={"env_vars": env}).remote())
    there = AuditLog.for_cluster(hr_cluster.name, other).read("refusal")
    assert len(there) == 1 and there[0]["worker"] and there[0]["rid"]
    far = there[0]["rid"]
    mine = [r for r in hr_cluster.audit.read("refusal", what="guard") if r.get("rid")]
    near = mine[-1]["rid"]
    assert near != far and not [r for r in mine if r["rid"] == far]
    mirror.drain(hr_cluster.state)
    rids = [r.get("rid") for r in hr_cluster.audit.read("refusal")]
    assert rids.count(far) == 1 and rids.count(near) == 1
    drained = [r for r in hr_cluster.audit.read("refusal") if r.get("rid") == far][0]
    assert drained["queued"] and drained["site"] == "cloud-b" and drained["fix"]


# ---- masks -------------------------------------------------------------------------------

def test_masks_must_cover_every_column_and_say_what_they_did(hr_cluster, patients):
    dest = f"cloud-b:datasets/masked-{uuid.uuid4().hex[:6]}"
    with pytest.raises(MaskingError, match=r"no rule for 5 column\(s\)"):
        sync_dataset(patients, dest, cluster=hr_cluster,
                     mask={"output_class": "public", "scan": False})
    partial = {"output_class": "internal", "columns": {"email": "hash", "id": "keep"}}
    with pytest.raises(MaskingError, match=r"name \(restricted\), ssn \(restricted\), "
                                           r"diagnosis \(restricted\)"):
        sync_dataset(patients, dest, cluster=hr_cluster, mask=partial)
    refused = _refusals(hr_cluster, what="mask", destination=dest)
    assert len(refused) == 2 and all(r["rule"] == "masking" for r in refused)

    result = sync_dataset(patients, dest, cluster=hr_cluster, mask=FULL_MASK)
    assert result.outcome == "committed" and result.data_class == "internal" and result.masked
    assert result.masking["reviewed_keep"] == ["id"] and result.masking["lowered"]
    record = hr_cluster.audit.read("sync", destination=dest, outcome="committed")[-1]
    assert record["masking"]["rules"]["ssn"] == "drop"
    table = open_dataset(dest, cluster=hr_cluster).read()
    assert table.column_names == ["id", "name", "email"]
    assert not set(table.column("name").to_pylist()) & set(_patients().column("name")
                                                           .to_pylist())


def test_a_symlinked_destination_path_is_refused(hr_cluster, patients):
    cloud_root = Path(hr_cluster.topology.sites["cloud-a"].storage.path)
    cloud_root.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in cloud_root.iterdir())
    link = _onprem_root(hr_cluster) / "datasets" / f"exfil-{uuid.uuid4().hex[:6]}"
    os.symlink(cloud_root, link)
    dest = f"onprem:datasets/{link.name}/copy"
    with pytest.raises(DataError, match="symlink"):
        sync_dataset(patients, dest, cluster=hr_cluster)
    assert sorted(p.name for p in cloud_root.iterdir()) == before
    failed = hr_cluster.audit.read("sync", destination=dest)[-1]
    assert failed["outcome"] == "failed" and "symlink" in failed["error"]


# ---- races -------------------------------------------------------------------------------

def test_two_first_time_syncs_at_once_both_decrypt_and_verify(hr_cluster, raw):
    """Item 7: a cluster with no keys yet; two syncs to the encrypted cloud-b at once each
    create the same master key. Both must commit data the final key file decrypts."""
    name = f"race{uuid.uuid4().hex[:6]}"
    cluster = hybridray.Cluster(hr_cluster.topology.model_copy(update={"name": name}),
                                audit=hr_cluster.audit, state=hr_cluster.state)
    keys = Path(hr_cluster.state.home) / "keys" / name
    assert not keys.exists()
    dests = [f"cloud-b:datasets/{name}-{i}" for i in range(2)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def one(dest):
        try:
            start.wait()
            sync_dataset(f"onprem:{raw}", dest, cluster=cluster, data_class="restricted",
                         mask=FULL_MASK)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(d,)) for d in dests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for dest in dests:
        assert open_dataset(dest, cluster=cluster).read().num_rows == ROWS
        assert verify_dataset(dest, cluster=cluster, full=True).ok
    assert len(json.loads((keys / "master-keys.json").read_text())) == 1


# ---- training ----------------------------------------------------------------------------

def test_training_refusals_of_checkpoint_and_output_sites_are_audited(hr_cluster):
    from hybridray.train.config import parse_train_config
    from hybridray.train.corpus import prepare_corpus
    from hybridray.train.plan import plan_run
    from hybridray.train.trainer import with_default_class

    config = with_default_class(parse_train_config(
        "name: sec-ckpt\ntrain: {workers: 1, cpus_per_worker: 0.5}\n"
        "checkpoint: {site: cloud-b}\n"), hr_cluster.topology)
    with pytest.raises(PlacementRefused, match="checkpoints inherit") as e:
        plan_run(config, hr_cluster)
    assert e.value.rule == "residency"
    rec = _refusals(hr_cluster, what="train checkpoint")[-1]
    assert rec["site"] == "cloud-b" and rec["data_class"] == "restricted" and rec["fix"]

    data = parse_train_config("name: sec-out\ndata: {output: 'cloud-a:datasets/shards'}\n").data
    with pytest.raises(PlacementRefused, match="may hold up to confidential"):
        prepare_corpus(data, hr_cluster.topology, cluster=hr_cluster, name="sec-out")
    assert _refusals(hr_cluster, what="train output")[-1]["site"] == "cloud-a"


# ---- jobs --------------------------------------------------------------------------------

def test_a_job_driver_runs_and_reports_where_it_was_placed(local_cluster, hybridray_home):
    from ray.job_submission import JobSubmissionClient

    from hybridray.deploy.jobs import submit

    code = ("import hybridray, ray\n"
            f"cluster = hybridray.connect({local_cluster.name!r})\n"
            "print('driver labels say', ray.get_runtime_context().get_node_labels()"
            "['hybridray.io/site'], flush=True)\n"
            "from hybridray.placement.guard import check_residency\n"
            "try:\n    check_residency('restricted')\n"
            "except hybridray.ResidencyViolation as e:\n    print('refused:', e.message)\n")
    lines: list[str] = []
    result = submit(local_cluster.name, [sys.executable, "-c", code], site="cloud-b",
                    data_classes=["internal"], working_dir=None, home=str(hybridray_home),
                    timeout=240, say=lines.append)
    out = "\n".join(lines)
    assert result.status == "SUCCEEDED" and result.ran_at == "cloud-b", out
    assert "hybridray: job driver running at site cloud-b" in out
    assert "driver labels say cloud-b" in out
    assert "refused: node at site cloud-b may hold up to internal" in out
    logs = JobSubmissionClient(local_cluster.dashboard_url).get_job_logs(result.job_id)
    assert "job driver running at site cloud-b" in logs and "driver labels say cloud-b" in logs
