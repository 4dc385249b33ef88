"""Object stores (a directory, a real S3 server on loopback), manifests, commits, the lease,
the emulator's lifecycle and Parquet encryption with the cluster's keys."""

from __future__ import annotations

import io
import json
import os
import pickle
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hybridray.exceptions import DataError
from hybridray.storage import s3server
from hybridray.storage.encryption import key_ring
from hybridray.storage.manifest import (
    CURRENT,
    LOCK,
    DatasetStore,
    Manifest,
    Part,
    SchemaInfo,
    SourceFile,
    manifest_key,
)
from hybridray.storage.objects import LocalStore, S3Store
from hybridray.storage.secrets import ClusterSecrets


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_server):
    if request.param == "local":
        return LocalStore(str(tmp_path / "root"), "onprem:").child("datasets/x")
    root = S3Store("hybridray-unit", "site", s3_server.endpoint, None, "cloud-a:")
    root.ensure_bucket()
    return root.child(f"datasets/{tmp_path.name}")


def test_objects_round_trip_list_and_delete(store):
    store.put("_parts/a.parquet", b"aaa")
    store.put("_parts/b.parquet", b"bb")
    store.put_text(CURRENT, "{}")
    assert store.list() == {"_parts/a.parquet": 3, "_parts/b.parquet": 2, CURRENT: 2}
    assert store.list("_parts") == {"_parts/a.parquet": 3, "_parts/b.parquet": 2}
    assert store.get("_parts/a.parquet") == b"aaa" and store.size("nope") is None
    assert b"".join(store.iter_chunks("_parts/a.parquet", 2)) == b"aaa"
    store.delete(["_parts/a.parquet"])
    assert "_parts/a.parquet" not in store.list() and store.get_text("nope") is None
    with pytest.raises(DataError, match=r"datasets/.*/nope does not exist"):
        store.get("nope")
    again = pickle.loads(pickle.dumps(store))  # what Ray does to hand it to a task
    assert again.get("_parts/b.parquet") == b"bb"


def test_a_failed_local_write_leaves_no_partial_object(tmp_path, monkeypatch):
    store = LocalStore(str(tmp_path), "onprem:")
    store.put("x", b"old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(DataError, match="disk full"):
        store.put("x", b"new")
    assert store.get("x") == b"old" and store.list() == {"x": 3}


def test_unreachable_s3_fails_fast_with_the_endpoint_named():
    store = S3Store("bucket", "p", "http://127.0.0.1:9", None, "cloud-a:").child("datasets/x")
    started = time.monotonic()
    with pytest.raises(DataError, match=r"cloud-a:datasets/x/_CURRENT .*127.0.0.1:9.*"
                                        r"unreachable after 3 attempts"):
        store.get_text(CURRENT)
    assert time.monotonic() - started < 30


def _manifest(version: int, parts: list[str], dataset_id: str = "d1") -> Manifest:
    return Manifest(dataset_id=dataset_id, version=version, committed_at="t",
                    data_class="internal", source={"address": "onprem:x"},
                    schema=SchemaInfo(fingerprint="s", fields=[], arrow=""), rows=len(parts),
                    bytes=len(parts),
                    parts=[Part(path=p, sha256="x", bytes=1, rows=1,
                                source=SourceFile(file=p, sha256="x", size=1)) for p in parts])


def test_commit_versions_and_garbage_collection(store):
    ds = DatasetStore(store)
    assert ds.current() is None and ds.versions() == []
    with pytest.raises(DataError, match="no committed version"):
        ds.manifest()
    for v, parts in enumerate([["_parts/a", "_parts/b"], ["_parts/b", "_parts/c"],
                               ["_parts/c", "_parts/d"]], start=1):
        for p in parts:
            store.put(p, b"x")
        ds.commit(_manifest(v, parts), expect=ds.current())
    store.put("_parts/staged", b"x")  # left by an interrupted sync
    store.put(manifest_key(9), b"{}")  # a manifest whose _CURRENT never followed
    assert ds.current().version == 3 and ds.versions() == [1, 2, 3]
    assert ds.manifest(1).parts[0].path == "_parts/a"
    assert ds.collect_garbage(keep=2) == (2, 2)  # v1 and v9; parts a and staged
    assert sorted(ds.parts()) == ["_parts/b", "_parts/c", "_parts/d"]
    assert ds.versions() == [2, 3]
    with pytest.raises(DataError, match=r"no version 1 \(versions kept: 2, 3\)"):
        ds.manifest(1)


def test_commit_refuses_when_another_sync_committed_first(store):
    ds = DatasetStore(store)
    seen = ds.current()
    ds.commit(_manifest(1, []), expect=None)
    with pytest.raises(DataError, match="committed by another sync"):
        ds.commit(_manifest(1, []), expect=seen)


def test_a_tampered_manifest_is_refused(store):
    ds = DatasetStore(store)
    ds.commit(_manifest(1, []), expect=None)
    key = manifest_key(1)
    store.put(key, store.get(key).replace(b'"rows": 0', b'"rows": 7'))
    with pytest.raises(DataError, match="sha256 differs"):
        ds.manifest()


def test_the_lease_excludes_a_second_writer_until_released_or_stale(store):
    ds = DatasetStore(store)
    ds.acquire("me")
    with pytest.raises(DataError, match=r"another sync holds the lease \(pid \d+"):
        DatasetStore(store).acquire("you")
    ds.release("me")
    DatasetStore(store).acquire("you")
    lease = json.loads(store.get_text(LOCK))
    lease.update(owner="dead", pid=2**22 + 1)  # a pid that is not running here
    store.put_text(LOCK, json.dumps(lease))
    ds.acquire("me")  # taken over from a holder that is gone
    assert json.loads(store.get_text(LOCK))["owner"] == "me"


def test_emulator_starts_on_a_free_port_and_stops_by_pid(tmp_path):
    server = s3server.start(log=tmp_path / "s3.log", buckets=["hybridray-a", "hybridray-b"])
    try:
        assert server.alive() and server.endpoint.startswith("http://127.0.0.1:")
        root = S3Store("hybridray-a", "", server.endpoint, None, "x:")
        root.put("k", b"v")
        assert root.get("k") == b"v"
        assert s3server.S3Server.from_json(server.to_json()) == server
    finally:
        assert s3server.stop(server)
    assert not server.alive() and not s3server.stop(server)


def test_parquet_encryption_with_cluster_keys(tmp_path):
    secrets = ClusterSecrets("enc", tmp_path)
    ring = pickle.loads(pickle.dumps(key_ring(secrets, footer_site="cloud-b")))
    assert ring.describe() == {"algorithm": "AES_GCM_V1", "kms": "hybridray-cluster:enc",
                               "footer_key": "enc/cloud-b"}
    table = pa.table({"email": ["someone@example.com"] * 3, "n": [1, 2, 3]})
    buf = io.BytesIO()
    pq.write_table(table, buf, encryption_properties=ring.encryption_properties())
    data = buf.getvalue()
    assert b"someone@example.com" not in data
    with pytest.raises(OSError, match="encrypted"):
        pq.ParquetFile(pa.BufferReader(data)).read()
    reader = key_ring(ClusterSecrets("enc", tmp_path), read_ids=["enc/cloud-b"])
    assert pq.ParquetFile(pa.BufferReader(data),
                          decryption_properties=reader.decryption_properties()).read() == table
    assert secrets.salt() == ClusterSecrets("enc", tmp_path).salt()  # kept across processes
    assert oct((tmp_path / "keys" / "enc").stat().st_mode & 0o777) == "0o700"
    other = key_ring(ClusterSecrets("other", tmp_path / "o"), read_ids=[])
    with pytest.raises(Exception, match="no master key"):
        pq.ParquetFile(pa.BufferReader(data),
                       decryption_properties=other.decryption_properties()).read()
