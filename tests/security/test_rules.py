"""Items 4, 7, 9 without a cluster: masks earn their class, races lose no key, signed
manifests and checkpoint metadata, symlinks refused, one rule for undeclared data.

The cluster-level versions of these (a sync refused and audited, two first syncs racing on
the real cluster) are in ``test_on_cluster.py``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re

import pyarrow as pa
import pytest

from hybridray.exceptions import DataError, IntegrityError, MaskingError, TrainError
from hybridray.placement import decide
from hybridray.placement.workload import Workload
from hybridray.storage import masking as M
from hybridray.storage.manifest import LOCK, DatasetStore, LeaseKeeper
from hybridray.storage.objects import LocalStore
from hybridray.storage.secrets import ClusterSecrets
from hybridray.topology import DataClass, load_topology
from tests.paths import CLUSTERS, ROOT

PATIENTS = pa.schema([("id", pa.int64()), ("name", pa.string()), ("email", pa.string()),
                      ("ssn", pa.string()), ("diagnosis", pa.string())])


# ---- masks must earn the class they claim (item 4) -------------------------------------------

def test_a_declared_output_class_without_rules_lowers_nothing():
    spec = M.load_spec({"output_class": "public", "scan": False})
    with pytest.raises(MaskingError, match=r"no rule for 5 column\(s\) above public: id "
                                           r"\(restricted\), name .*diagnosis"):
        M.check_coverage(spec, PATIENTS, DataClass.restricted, "onprem:patients")


def test_a_partial_mask_names_every_uncovered_column():
    spec = M.load_spec({"output_class": "internal",
                        "columns": {"email": "hash", "id": "keep"}})
    with pytest.raises(MaskingError) as e:
        M.check_coverage(spec, PATIENTS, DataClass.restricted, "onprem:patients")
    for col in ("name", "ssn", "diagnosis"):
        assert col in str(e.value)
    assert "email" not in str(e.value).split("above internal:")[1]
    assert "keep" in str(e.value)  # the fix names the reviewed rule


def test_columns_marked_at_or_below_the_output_class_need_no_rule():
    schema = pa.schema([pa.field("id", pa.int64(), metadata={b"hybridray.data_class": b"public"}),
                        pa.field("ssn", pa.string())])
    spec = M.load_spec({"output_class": "internal", "columns": {"ssn": "drop"}})
    M.check_coverage(spec, schema, DataClass.restricted, "x")  # id is public: fine
    with pytest.raises(MaskingError, match="ssn"):
        M.check_coverage(M.load_spec({"output_class": "internal"}), schema,
                         DataClass.restricted, "x")


def test_masking_record_says_what_was_done():
    spec = M.load_spec({"output_class": "internal",
                        "columns": {"id": "keep", "name": "hash", "ssn": "drop"}})
    did = M.actions(spec, DataClass.restricted)
    assert did["reviewed_keep"] == ["id"] and did["changed_columns"] == ["name", "ssn"]
    assert did["lowered"] and did["class_from"] == "restricted" and did["class_to"] == "internal"
    assert M.actions(M.load_spec({}), DataClass.restricted)["lowered"] is False


@pytest.mark.parametrize("kind, value", [
    ("ssn", "patient 123-45-6789 admitted"), ("card", "paid with 4111 1111 1111 1111"),
    ("card", "card 4111111111111111"), ("iban", "to DE89 3704 0044 0532 0130 00"),
    ("ipv4", "seen from 10.12.0.7"), ("email", "a@b.example.org"), ("phone", "+1 555 010 1234"),
])
def test_the_scan_finds_every_pii_kind_the_docs_list(kind, value):
    table = pa.table({"note": [value]})
    assert M._any_match(table.column("note").combine_chunks(), M.PATTERNS[kind])
    spec = M.load_spec({"columns": {}})
    with pytest.raises(MaskingError, match="column 'note' holds what looks like"):
        M.scan(table, M.apply(table, spec, b"s" * 32), spec, "f")


def test_the_scan_leaves_dates_ids_and_digests_alone():
    table = pa.table({"note": ["2024-01-15 ticket 42 sha 9f86d081884c7d65 v1.2.3 10:30"]})
    spec = M.load_spec({"columns": {}})
    M.scan(table, M.apply(table, spec, b"s" * 32), spec, "f")


def test_docs_list_the_same_pii_kinds_as_the_scan():
    text = (ROOT / "docs" / "data.md").read_text()
    listed = re.search(r"PII kinds the scan looks for: (.*?)\.", text, re.S)
    assert listed, "docs/data.md lost its list of PII kinds"
    assert sorted(re.findall(r"`(\w+)`", listed.group(1))) == sorted(M.SCAN_PATTERNS)


# ---- no data loss from races (item 7) --------------------------------------------------------

def _make_keys(home: str, site: str, out) -> None:
    keys = ClusterSecrets("race", home).master_keys([f"race/{site}"])
    salt = ClusterSecrets("race", home).salt()
    out.put((site, keys[f"race/{site}"].hex(), salt.hex()))


def test_first_time_keys_created_at_once_all_survive(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_make_keys, args=(str(tmp_path), f"s{i}", out))
             for i in range(4)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    final = ClusterSecrets("race", tmp_path).master_keys()
    for site, key, _ in got:  # every key a process used is still the stored one
        assert final[f"race/{site}"].hex() == key
    assert len({salt for *_, salt in got}) == 1  # and one salt for all
    assert oct(os.stat(tmp_path / "keys" / "race" / "master-keys.json").st_mode)[-3:] == "600"


def test_the_lease_is_taken_by_compare_and_swap_and_renewed(tmp_path):
    store = LocalStore(str(tmp_path / "ds"), "onprem:")
    a, b = DatasetStore(store), DatasetStore(store)
    a.acquire("a")
    stale = store.get(LOCK)
    with pytest.raises(DataError, match="holds the lease"):
        b.acquire("b")
    # a CAS from a stale read loses: b read the lease, a renewed it, b's swap must fail
    a.renew("a")
    assert store.swap(LOCK, b"{}", stale) is False
    with LeaseKeeper(a, "a", every_s=0.05) as keeper:
        while keeper.renewals < 2 and keeper.error is None:
            pass
        keeper.check()
    assert json.loads(store.get(LOCK))["owner"] == "a"
    store.put(LOCK, json.dumps({"owner": "thief", "expires": 1e12}).encode())
    with pytest.raises(DataError, match="lost its lease"):
        a.renew("a")
    with pytest.raises(DataError, match="lost its lease"):
        a.check_lease("a")


# ---- signed manifests and checkpoint metadata (item 9) ---------------------------------------

def test_a_hand_edited_manifest_is_refused_even_with_a_recomputed_sha(tmp_path):
    import hashlib

    from hybridray.storage.manifest import CURRENT, Manifest, SchemaInfo

    key = ClusterSecrets("sig", tmp_path).signing_key()
    store = LocalStore(str(tmp_path / "ds"), "onprem:")
    ds = DatasetStore(store, key)
    m = Manifest(dataset_id="d", version=1, committed_at="now", data_class="restricted",
                 schema=SchemaInfo(fingerprint="f", fields=[], arrow=""), rows=0, bytes=0,
                 parts=[])
    ds.commit(m, expect=None)
    assert ds.manifest().data_class is DataClass.restricted
    cur = json.loads(store.get(CURRENT))
    body = json.loads(store.get(cur["manifest"]))
    body["data_class"] = "public"  # the attack: edit, then fix the recorded sha256
    raw = json.dumps(body).encode()
    store.put(cur["manifest"], raw)
    cur["manifest_sha256"] = hashlib.sha256(raw).hexdigest()
    store.put(CURRENT, json.dumps(cur).encode())
    with pytest.raises(IntegrityError, match="signature does not match"):
        ds.manifest()
    del body["signature"]
    raw = json.dumps(body).encode()
    store.put(cur["manifest"], raw)
    cur["manifest_sha256"] = hashlib.sha256(raw).hexdigest()
    store.put(CURRENT, json.dumps(cur).encode())
    with pytest.raises(IntegrityError, match="not signed"):
        ds.manifest()


def test_checkpoint_metadata_edits_are_refused_and_unsigned_ones_take_the_default(tmp_path):
    from hybridray.train import checkpoint as ckpt

    key = ClusterSecrets("sig", tmp_path).signing_key()
    meta = ckpt.sign_meta({"format": 1, "data_class": "restricted", "site": "onprem",
                           "tokenizer": "bytes"}, key)
    assert ckpt.verify_meta(meta, key, "m")["signed"] is True
    with pytest.raises(TrainError, match="signature does not match"):
        ckpt.verify_meta({**meta, "data_class": "public"}, key, "m")
    unsigned = {k: v for k, v in meta.items() if k != "signature"}
    assert ckpt.verify_meta({**unsigned, "data_class": "public"}, key, "m")["data_class"] \
        == "restricted"


# ---- paths resolved under the site root (item 9) ---------------------------------------------

def test_a_symlinked_destination_is_refused(tmp_path):
    onprem, cloud = tmp_path / "onprem", tmp_path / "cloud-a"
    (onprem / "datasets").mkdir(parents=True)
    cloud.mkdir()
    os.symlink(cloud, onprem / "datasets" / "exfil")
    store = LocalStore(str(onprem), "onprem:", str(onprem)).child("datasets/exfil")
    with pytest.raises(DataError, match="symlink"):
        store.put("_parts/p.parquet", b"restricted rows")
    assert list(cloud.iterdir()) == []
    os.symlink("/etc/passwd", onprem / "datasets" / "leak")
    with pytest.raises(DataError, match="not below the site's storage root"):
        LocalStore(str(onprem), "onprem:", str(onprem)).child("datasets").get("leak")


# ---- one rule for undeclared data (item 9) ---------------------------------------------------

def test_undeclared_work_sync_and_training_all_take_the_cluster_default():
    from hybridray.storage.plan import Source, resolve_class
    from hybridray.train.config import parse_train_config
    from hybridray.train.trainer import with_default_class

    topology = load_topology(CLUSTERS / "local.yaml")
    assert topology.default_data_class is DataClass.restricted
    placement = decide(topology, Workload(cpus=1))
    assert placement.workload.data_class is DataClass.restricted
    assert placement.sites == ["onprem"]
    assert placement.summary()["data_class_source"].startswith("cluster default")
    assert resolve_class(Source(None, None, {}), None, topology.default_data_class) == (
        DataClass.restricted, "default")
    config = with_default_class(parse_train_config(""), topology)
    assert config.data.data_class is DataClass.restricted
    relaxed = topology.model_copy(update={"default_data_class": DataClass.internal})
    assert decide(relaxed, Workload(cpus=1)).workload.data_class is DataClass.internal
    assert with_default_class(parse_train_config(""), relaxed).data.data_class is \
        DataClass.internal
    assert resolve_class(Source(None, None, {}), None, relaxed.default_data_class)[0] is \
        DataClass.internal


def test_exact_public_paths():
    from hybridray.serve.gate import GatePolicy

    policy = GatePolicy()
    assert policy.is_public("/healthz") and policy.is_public("/t-lm/healthz", "/t-lm")
    for path in ("/v1/models/healthz", "/x/openapi.json", "/v1/docs", "/healthz/",
                 "/t-lm/v1/healthz"):
        assert not policy.is_public(path, "/t-lm"), path


def test_no_sampling_input_the_schema_admits_breaks_the_sampler():
    import torch

    from hybridray.serve.lm import LanguageModel, Sampling
    from hybridray.serve.protocol import CompletionRequest

    raw = torch.randn(300)
    counts = torch.zeros(300)
    for t in (1e-320, 5e-324, 1e-30, 2.0):
        token, _, _ = LanguageModel._sample(None, raw, counts, Sampling(temperature=t), None)
        assert 0 <= token <= 256
    with pytest.raises(ValueError, match="token ids as strings"):
        CompletionRequest(model="m", prompt="x", logit_bias={"²": 1})
