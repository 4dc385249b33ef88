"""The corpus is prepared with Ray Data at the data's site, committed by manifest, verified."""

from __future__ import annotations

import json

import pytest

from hybridray.exceptions import PlacementRefused, TrainError
from hybridray.storage.fs import parse_address
from hybridray.train.config import DataSection
from hybridray.train.corpus import MANIFEST, load_tokens, prepare_corpus, read_manifest

pytestmark = pytest.mark.slow


def test_stdlib_corpus_is_tokenized_and_stored_at_the_onprem_site(hr_cluster):
    data = DataSection(max_files=12, output="onprem:datasets/test-corpus", shard_files=5)
    m = prepare_corpus(data, hr_cluster.topology, cluster=hr_cluster, name="corpus-test")
    assert m.data["data_class"] == "restricted" and m.site == "onprem"
    assert m.data["prepared_at_sites"] == ["onprem"]
    assert all(s["tokenized_at"] == ["onprem"] for s in m.data["shards"])
    assert m.data["splits"]["train"]["files"] + m.data["splits"]["val"]["files"] == 12
    assert m.data["splits"]["val"]["files"] >= 1
    fs, base = parse_address("onprem:datasets/test-corpus", hr_cluster.topology).resolve(
        hr_cluster.topology)
    assert json.loads(fs.open_input_stream(f"{base}/{MANIFEST}").read())["fingerprint"] == \
        m.data["fingerprint"]

    tokens, nbytes = load_tokens(m.data, str(m.address), hr_cluster.topology)
    assert len(tokens["train"]) == m.tokens("train") and nbytes > 0
    assert (tokens["train"] == 256).sum() == m.data["splits"]["train"]["files"]   # EOT per file
    assert bytes(tokens["train"][:64].astype("u1")).isascii()

    again = prepare_corpus(data, hr_cluster.topology, cluster=hr_cluster, name="corpus-test")
    assert again.data["shards"] == m.data["shards"]          # reused, not rebuilt
    records = hr_cluster.audit.read("placement", workload="corpus-test-corpus")
    assert records and records[-1]["sites"] == ["onprem"]

    shard = m.data["shards"][0]["path"]
    with fs.open_output_stream(f"{base}/{shard}") as f:       # corrupt one shard
        f.write(b"not parquet")
    with pytest.raises(TrainError, match=f"{shard}: sha256 does not match manifest.json"):
        load_tokens(m.data, str(m.address), hr_cluster.topology)
    assert read_manifest("onprem:datasets/test-corpus", hr_cluster.topology).data == m.data


def test_shards_never_go_to_a_site_that_may_not_hold_them(hr_cluster):
    data = DataSection(max_files=4, output="cloud-b:datasets/leak")
    with pytest.raises(PlacementRefused, match="may hold up to internal, not restricted"):
        prepare_corpus(data, hr_cluster.topology, cluster=hr_cluster)


def test_a_class_is_never_lowered_by_relabelling(hr_cluster):
    data = DataSection(max_files=4, output="onprem:datasets/test-relabel", shard_files=4)
    prepare_corpus(data, hr_cluster.topology, cluster=hr_cluster)
    lower = data.model_copy(update={"data_class": "internal"})
    with pytest.raises(TrainError, match="this corpus is restricted; the config says internal"):
        prepare_corpus(lower, hr_cluster.topology, cluster=hr_cluster)


def test_missing_source_and_never_prepare_are_clear(hr_cluster, tmp_path):
    with pytest.raises(TrainError, match="no files matching"):
        prepare_corpus(DataSection(source=str(tmp_path), output="onprem:datasets/empty"),
                       hr_cluster.topology, cluster=hr_cluster)
    with pytest.raises(TrainError, match="no prepared corpus"):
        prepare_corpus(DataSection(output="onprem:datasets/never", prepare="never"),
                       hr_cluster.topology, cluster=hr_cluster)
