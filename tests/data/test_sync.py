"""``sync_dataset`` on a real three-site cluster with cloud storage on a real S3 server.

Every test writes its own dataset under a fresh path at on-prem (restricted by default) and
syncs it to cloud-a (may hold confidential) or cloud-b (internal, encrypted at rest).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from hybridray.exceptions import (
    ConfigError,
    DataError,
    IntegrityError,
    MaskingError,
    PlacementRefused,
)
from hybridray.storage import dataset_store, open_dataset, parse_address, sync_dataset
from hybridray.storage.manifest import CURRENT, DatasetStore
from hybridray.storage.verify import verify_dataset
from tests.data.conftest import EMAIL_RE, PHONE_RE, emulated, tickets, write_tickets
from tests.paths import ROOT

pytestmark = pytest.mark.slow

MASK = ROOT / "configs" / "masks" / "tickets.yaml"


def store_of(cluster, address):
    return dataset_store(cluster.topology, parse_address(address, cluster.topology))


def no_raw_pii(table: pa.Table, source: pa.Table) -> None:
    emails = set(source.column("customer_email").to_pylist())
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type):
            assert not pc.any(pc.match_substring_regex(col, EMAIL_RE)).as_py(), name
            assert not pc.any(pc.match_substring_regex(col, PHONE_RE)).as_py(), name
            assert not emails & set(col.to_pylist()), name


def test_masked_sync_onprem_to_cloud(s3_cluster, onprem_root, name):
    rows = write_tickets(onprem_root / name, files=3, rows=300)
    src = pq.read_table(onprem_root / name)
    result = sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    assert (result.outcome, result.version, result.rows, result.rows_moved) == \
        ("committed", 1, rows, rows)
    assert (result.source_class, result.data_class, result.masked) == \
        ("restricted", "confidential", True)
    assert result.sites == {"read": ["onprem"], "write": ["cloud-a"]}
    assert result.bytes_moved > 0 and result.files_changed == 3

    ds = open_dataset(f"cloud-a:{name}", cluster=s3_cluster)
    out = ds.read()
    assert out.num_rows == rows and ds.data_class == "confidential"
    assert "customer_phone" not in out.column_names
    assert sorted(out.column("id").to_pylist()) == sorted(src.column("id").to_pylist())
    no_raw_pii(out, src)
    for part in ds.manifest.parts:  # the stored bytes themselves hold no raw value either
        blob = store_of(s3_cluster, f"cloud-a:{name}").get(part.path)
        assert b"@example.com" not in blob and b"+1 555" not in blob

    audit = s3_cluster.audit
    transfers = audit.read("transfer", sync_id=result.sync_id)
    assert sum(t["bytes"] for t in transfers) == result.bytes_moved
    assert {(t["src"], t["dst"]) for t in transfers} == {("onprem", "cloud-a")}
    [record] = audit.read("sync", sync_id=result.sync_id)
    assert record["outcome"] == "committed" and record["bytes_moved"] == result.bytes_moved
    placed = [r for r in audit.read("placement") if r["workload"].endswith(name)]
    assert {(r["workload"].split()[1], r["sites"][0]) for r in placed} >= \
        {("read", "onprem"), ("write", "cloud-a")}


def test_restricted_dataset_to_cloud_is_refused_and_audited(s3_cluster, onprem_root, name):
    write_tickets(onprem_root / name, files=1, rows=10)
    with pytest.raises(PlacementRefused, match=r"restricted by default.*cloud-a may hold up "
                                                r"to confidential") as err:
        sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster)
    assert err.value.rule == "residency" and "--mask" in err.value.fix
    assert store_of(s3_cluster, f"cloud-a:{name}").list() == {}  # not one byte moved
    refusals = [r for r in s3_cluster.audit.read("sync", outcome="refused")
                if r["destination"] == f"cloud-a:{name}"]
    assert refusals and refusals[-1]["rule"] == "residency"
    assert any(r.get("workload") == f"sync write cloud-a:{name}"   # guard refusals have none
               for r in s3_cluster.audit.read("refusal"))
    # masked down to confidential it still may not go to cloud-b (internal)
    with pytest.raises(PlacementRefused, match="still confidential after masking"):
        sync_dataset(f"onprem:{name}", f"cloud-b:{name}", cluster=s3_cluster, mask=MASK)


def test_resync_without_change_moves_nothing_and_one_changed_file_moves_one(
        s3_cluster, onprem_root, name):
    write_tickets(onprem_root / name, files=4, rows=200)
    first = sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    again = sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    assert (again.outcome, again.version, again.bytes_moved, again.parts_written) == \
        ("up-to-date", first.version, 0, 0)
    assert again.files_unchanged == 4
    assert s3_cluster.audit.read("transfer", sync_id=again.sync_id) == []

    pq.write_table(tickets(250, start=10_000, seed=9), onprem_root / name / "part-002.parquet",
                   row_group_size=100)
    changed = sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    assert (changed.files_changed, changed.parts_written, changed.files_unchanged) == (1, 1, 3)
    assert changed.version == first.version + 1 and changed.rows == 3 * 200 + 250
    assert changed.rows_moved == 250

    os.remove(onprem_root / name / "part-000.parquet")
    deleted = sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    assert (deleted.files_deleted, deleted.bytes_moved, deleted.rows) == (1, 0, 2 * 200 + 250)
    ids = open_dataset(f"cloud-a:{name}", cluster=s3_cluster).read(["id"]).column("id")
    assert len(ids) == 650 and min(ids.to_pylist()) == 200
    # an older version stays readable while it is kept
    assert open_dataset(f"cloud-a:{name}", cluster=s3_cluster, version=1).rows == 800


def test_flipped_byte_is_caught_by_verify_and_repaired_by_checksum_sync(
        s3_cluster, onprem_root, name):
    write_tickets(onprem_root / name, files=2, rows=200)
    sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    report = verify_dataset(f"cloud-a:{name}", cluster=s3_cluster)
    assert report.ok and report.parts == 2 and report.site == "cloud-a"

    store = store_of(s3_cluster, f"cloud-a:{name}")
    victim = DatasetStore(store).manifest().parts[1].path
    blob = bytearray(store.get(victim))
    blob[len(blob) // 2] ^= 0x01
    store.put(victim, bytes(blob))
    with pytest.raises(IntegrityError, match=r"1 problem\(s\)") as err:
        verify_dataset(f"cloud-a:{name}", cluster=s3_cluster)
    assert len(err.value.problems) == 1 and victim in err.value.problems[0]
    assert "sha256" in err.value.problems[0]
    # a plain sync trusts what it committed; --checksum re-reads it and rewrites the part
    repaired = sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK,
                            checksum=True)
    assert repaired.parts_written == 1
    assert verify_dataset(f"cloud-a:{name}", cluster=s3_cluster, full=True).ok


def start_job_script(cluster, *args: str) -> subprocess.Popen:
    """``python jobs/sync.py ARGS`` as its own driver process, as a user would run it."""
    from hybridray.cluster import ray_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(ray_env(cluster.state))
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen([sys.executable, "jobs/sync.py", *args], env=env, cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def settle(store, seconds: float = 3.0, limit: float = 60.0) -> None:
    """Wait until nothing new appears under ``_parts/`` (the killed job's tasks are gone)."""
    deadline = time.monotonic() + limit
    seen, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = store.list("_parts")
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
        time.sleep(0.5)


@pytest.mark.chaos
def test_driver_killed_mid_write_leaves_old_version_and_rerun_completes(
        s3_cluster, hr_cluster, onprem_root, name, internal_mask):
    """jobs/sync.py to cloud-b (the cluster's own S3 server, encrypted), SIGKILLed after its
    third part, then run again."""
    if not emulated(hr_cluster.topology, "cloud-b"):
        pytest.skip("clusters/local.yaml does not put cloud-b on the cluster's S3 server")
    args = [f"onprem:{name}", f"cloud-b:{name}", "--mask", str(internal_mask),
            "--part-mb", "0", "--cpus", "2"]  # one row group per part, one part at a time
    write_tickets(onprem_root / name, files=4, rows=400, row_group=100)
    first = sync_dataset(*args[:2], cluster=hr_cluster, mask=internal_mask, part_bytes=0)
    for i in range(4):  # every file changes, ids too: a mix of versions would show
        pq.write_table(tickets(400, start=50_000 + i * 400, seed=100 + i),
                       onprem_root / name / f"part-{i:03d}.parquet", row_group_size=100)
    store = store_of(hr_cluster, f"cloud-b:{name}")
    committed = {p.path for p in DatasetStore(store).manifest().parts}

    proc = start_job_script(hr_cluster, *args)
    watchdog = time.monotonic() + 240
    written: list[str] = []
    try:
        while len(written) < 3:  # 16 parts in all: kill after the third is written
            line = proc.stderr.readline()
            assert line, f"jobs/sync.py exited early: {proc.stdout.read()[-2000:]}"
            if line.strip().startswith("wrote _parts/"):
                written.append(line.split()[1])
            assert time.monotonic() < watchdog, "jobs/sync.py too slow to write 3 parts"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    settle(store)

    ds = DatasetStore(store)
    assert ds.current().version == first.version  # the killed driver committed nothing
    assert set(written) <= set(ds.parts()) - committed  # its parts are staged, invisible:
    old = open_dataset(f"cloud-b:{name}", cluster=hr_cluster).read(["id"]).column("id")
    assert sorted(old.to_pylist()) == list(range(1600))

    rerun = start_job_script(hr_cluster, *args, "--json")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["outcome"] == "committed" and result["version"] == first.version + 1
    assert result["parts_adopted"] >= len(written)          # verified, not moved again
    assert result["parts_adopted"] + result["parts_written"] == 16
    assert verify_dataset(f"cloud-b:{name}", cluster=hr_cluster, full=True).ok
    ids = open_dataset(f"cloud-b:{name}", cluster=hr_cluster).read(["id"]).column("id")
    assert len(ids) == 1600 and len(set(ids.to_pylist())) == 1600
    assert sorted(ids.to_pylist()) == list(range(50_000, 51_600))
    kept = {p.path for v in ds.versions() for p in ds.manifest(v).parts}
    assert set(ds.parts()) == kept  # what the killed sync left was adopted or collected


def test_encrypted_at_rest_destination_is_readable_only_with_cluster_keys(
        s3_cluster, onprem_root, name):
    write_tickets(onprem_root / name, files=2, rows=100)
    internal = {"output_class": "internal",
                "columns": {"id": "keep", "created_at": "keep",
                            "customer_email": "hash", "customer_phone": "drop",
                            "body": "drop", "amount": {"rule": "generalize", "bucket": 100}}}
    result = sync_dataset(f"onprem:{name}", f"cloud-b:{name}", cluster=s3_cluster,
                          mask=internal)
    assert result.encrypted and result.data_class == "internal"
    store = store_of(s3_cluster, f"cloud-b:{name}")
    manifest = DatasetStore(store).manifest()
    assert manifest.encryption["footer_key"] == f"{s3_cluster.name}/cloud-b"
    blob = store.get(manifest.parts[0].path)
    with pytest.raises(OSError, match="encrypted"):
        pq.ParquetFile(pa.BufferReader(blob)).read()
    table = open_dataset(f"cloud-b:{name}", cluster=s3_cluster).read()
    assert table.num_rows == 200 and set(table.column_names) == {"id", "customer_email",
                                                                   "created_at", "amount"}
    assert verify_dataset(f"cloud-b:{name}", cluster=s3_cluster, full=True).ok
    import ray

    from hybridray.placement import Workload, data_remote_args

    placement = s3_cluster.place(Workload(name="read", kind="data", data_classes=["internal"],
                                          site="cloud-b", burst=False))
    rd = open_dataset(f"cloud-b:{name}", cluster=s3_cluster).to_ray(
        **data_remote_args(placement))
    assert rd.count() == 200 and ray.is_initialized()


# ---- bad input: each a clear error, nothing committed -----------------------------------

def test_missing_source_and_unknown_site(s3_cluster, name):
    with pytest.raises(DataError, match=rf"onprem:{name} does not exist"):
        sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    with pytest.raises(ConfigError, match=r"unknown site 'mars'.*onprem, cloud-a, cloud-b"):
        sync_dataset(f"mars:{name}", f"cloud-a:{name}", cluster=s3_cluster)
    assert store_of(s3_cluster, f"cloud-a:{name}").list() == {}


def test_corrupt_source_file_is_named(s3_cluster, onprem_root, name):
    write_tickets(onprem_root / name, files=3, rows=50)
    path = onprem_root / name / "part-001.parquet"
    path.write_bytes(path.read_bytes()[:-40])  # truncated: the footer is gone
    (onprem_root / name / "notes.txt").write_text("not parquet")
    with pytest.raises(DataError, match=r"2 source file\(s\) cannot be read") as err:
        sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    assert "notes.txt: not a readable Parquet file" in str(err.value)
    assert "part-001.parquet: not a readable Parquet file" in str(err.value)
    assert store_of(s3_cluster, f"cloud-a:{name}").size(CURRENT) is None


def test_mismatched_schemas_name_the_files(s3_cluster, onprem_root, name):
    write_tickets(onprem_root / name, files=3, rows=50)
    odd = tickets(50).drop_columns(["amount"])
    pq.write_table(odd, onprem_root / name / "part-009.parquet")
    with pytest.raises(DataError, match=r"disagree on their columns.*part-000.parquet, "
                                        r"part-001.parquet, part-002.parquet \(3 files\); "
                                        r"versus part-009.parquet \(1 file\)"):
        sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    assert store_of(s3_cluster, f"cloud-a:{name}").size(CURRENT) is None


def test_destination_holding_another_dataset_needs_overwrite(s3_cluster, onprem_root, name):
    write_tickets(onprem_root / name / "a", files=1, rows=30)
    write_tickets(onprem_root / name / "b", files=1, rows=40, seed=5)
    sync_dataset(f"onprem:{name}/a", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    with pytest.raises(DataError, match=rf"holds another dataset \(synced from "
                                        rf"onprem:{name}/a, version 1\).*--overwrite"):
        sync_dataset(f"onprem:{name}/b", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    assert open_dataset(f"cloud-a:{name}", cluster=s3_cluster).rows == 30
    replaced = sync_dataset(f"onprem:{name}/b", f"cloud-a:{name}", cluster=s3_cluster,
                            mask=MASK, overwrite=True)
    assert replaced.version == 2 and replaced.rows == 40
    assert DatasetStore(store_of(s3_cluster, f"cloud-a:{name}")).versions() == [2]

    foreign = store_of(s3_cluster, f"cloud-a:{name}-foreign")
    foreign.put("data.parquet", b"someone else's")
    with pytest.raises(DataError, match=r"1 file\(s\) that hybridray did not write"):
        sync_dataset(f"onprem:{name}/a", f"cloud-a:{name}-foreign", cluster=s3_cluster,
                     mask=MASK)


def test_s3_endpoint_down_fails_fast_and_commits_nothing(s3_cluster, onprem_root, name):
    import hybridray
    from hybridray.topology import load_topology

    write_tickets(onprem_root / name, files=1, rows=10)
    state = s3_cluster.state
    topology = load_topology(state.source_file, [
        *state.overrides, "sites.cloud-a.storage.root=s3://hybridray-down/data",
        "sites.cloud-a.storage.endpoint=http://127.0.0.1:9"])
    down = hybridray.Cluster(topology, audit=s3_cluster.audit, state=state)
    started = time.monotonic()
    with pytest.raises(DataError, match=r"127\.0\.0\.1:9.*unreachable after 3 attempts"):
        sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=down, mask=MASK)
    assert time.monotonic() - started < 60
    failed = [r for r in s3_cluster.audit.read("sync", outcome="failed")
              if r["destination"] == f"cloud-a:{name}"]
    assert failed and "unreachable" in failed[-1]["error"]


def test_raw_value_left_by_the_rules_fails_the_sync(s3_cluster, onprem_root, name):
    write_tickets(onprem_root / name, files=2, rows=50)
    leaky = {"output_class": "confidential",
             "columns": {"customer_email": "hash", "customer_phone": "drop", "id": "keep",
                         "created_at": "keep", "amount": "keep"}}  # body forgotten
    with pytest.raises(MaskingError, match=r"no rule for 1 column\(s\) above confidential: "
                                           r"body \(restricted\)"):
        sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=leaky)
    assert store_of(s3_cluster, f"cloud-a:{name}").size(CURRENT) is None


def test_a_synced_dataset_trains_at_its_destination_from_the_committed_version_only(
        s3_cluster, onprem_root, name):
    """dataset:SITE:PATH as a training corpus: the masked copy at cloud-a, tokenized there."""
    from hybridray.exceptions import TrainError
    from hybridray.train.config import DataSection
    from hybridray.train.corpus import load_tokens, prepare_corpus

    rows = write_tickets(onprem_root / name, files=2, rows=50)
    result = sync_dataset(f"onprem:{name}", f"cloud-a:{name}", cluster=s3_cluster, mask=MASK)
    sink = pa.BufferOutputStream()        # a staged part no manifest names (a cut sync)
    pq.write_table(tickets(30, start=10_000), sink)
    store_of(s3_cluster, f"cloud-a:{name}").put("_parts/zz-stray.parquet",
                                                sink.getvalue().to_pybytes())

    data = DataSection(source=f"dataset:cloud-a:{name}", text_column="body",
                       data_class="confidential", output=f"cloud-a:{name}-tokens",
                       shard_files=40, val_fraction=0.2)
    m = prepare_corpus(data, s3_cluster.topology, cluster=s3_cluster, name="from-dataset")
    assert m.site == "cloud-a" and m.data["prepared_at_sites"] == ["cloud-a"]
    assert m.data["source_version"] == result.version
    assert all(s["tokenized_at"] == ["cloud-a"] for s in m.data["shards"])
    assert sum(s["rows"] for s in m.data["shards"]) == rows      # committed rows, no stray
    tokens, _ = load_tokens(m.data, str(m.address), s3_cluster.topology)
    assert (tokens["train"] == 256).sum() + (tokens["val"] == 256).sum() == rows
    text = bytes(tokens["train"][tokens["train"] < 256].astype("u1"))
    assert b"ticket " in text and b"[EMAIL]" in text     # the masked text was trained on
    assert b"@corp.example.org" not in text and b"ticket 10000" not in text

    with pytest.raises(TrainError, match="above data.data_class=internal"):
        prepare_corpus(data.model_copy(update={"data_class": "internal",
                                               "output": f"cloud-a:{name}-low"}),
                       s3_cluster.topology, cluster=s3_cluster)
    with pytest.raises(TrainError, match="no column 'text'; set data.text_column to one of"):
        prepare_corpus(data.model_copy(update={"text_column": "text",
                                               "output": f"cloud-a:{name}-x"}),
                       s3_cluster.topology, cluster=s3_cluster)
