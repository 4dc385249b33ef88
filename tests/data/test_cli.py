"""``hybridray sync | verify | ls`` as a user types them, and the S3 server ``up`` brings."""

from __future__ import annotations

import json
import types

import pytest

from hybridray.cli import main
from hybridray.storage import emulator, s3server
from hybridray.storage.manifest import DatasetStore
from hybridray.topology import load_topology
from tests.data.conftest import emulated, write_tickets
from tests.data.test_sync import store_of
from tests.paths import CLUSTERS


def test_emulated_sites_are_local_s3_roots_without_endpoint():
    topology = load_topology(CLUSTERS / "local.yaml")
    assert emulated(topology, "cloud-b") is False  # until `up` gives it an endpoint
    assert emulator.emulated_sites(topology) == ["cloud-b"]
    with_endpoint = load_topology(CLUSTERS / "local.yaml",
                                  ["sites.cloud-b.storage.endpoint=http://10.0.0.1:9000"])
    assert emulator.emulated_sites(with_endpoint) == []
    aws = load_topology(CLUSTERS / "onprem-aws.yaml")
    assert emulator.emulated_sites(aws) == []  # a real cloud site keeps real S3


def test_start_for_records_the_server_and_endpoint_and_stop_for_stops_it(tmp_path):
    topology = load_topology(CLUSTERS / "local.yaml")
    state = types.SimpleNamespace(state_dir=tmp_path, services={}, overrides=[],
                                  topology_snapshot=topology.model_dump(mode="json"))
    emulator.start_for(state, topology)
    server = s3server.S3Server.from_json(state.services["s3"])
    try:
        assert server.alive()
        assert state.overrides == [f"sites.cloud-b.storage.endpoint={server.endpoint}"]
        resolved = load_topology(CLUSTERS / "local.yaml", state.overrides)
        store = store_of(types.SimpleNamespace(topology=resolved), "cloud-b:probe")
        store.put("x", b"1")  # the bucket exists already
        assert store.get("x") == b"1"
        assert (tmp_path / "logs" / "s3.log").exists()
    finally:
        assert emulator.stop_for(state)
    assert not server.alive()


@pytest.mark.slow
def test_up_serves_cloud_b_from_the_clusters_own_s3_server(hr_cluster):
    record = hr_cluster.state.services.get("s3")
    assert record, "hybridray up did not start an S3 server for cloud-b"
    server = s3server.S3Server.from_json(record)
    assert server.alive()
    assert hr_cluster.topology.sites["cloud-b"].storage.endpoint == server.endpoint
    assert hr_cluster.topology.sites["cloud-a"].storage.scheme == "file"


@pytest.mark.slow
def test_sync_ls_verify_from_the_command_line(hr_cluster, onprem_root, name, internal_mask,
                                              capsys):
    write_tickets(onprem_root / name, files=2, rows=100)
    cluster = ["--cluster", hr_cluster.name]
    assert main(["sync", f"onprem:{name}", f"cloud-b:{name}", "--mask", str(internal_mask),
                 "--json", *cluster]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["outcome"], result["rows"], result["data_class"], result["encrypted"]) == \
        ("committed", 200, "internal", True)

    assert main(["ls", "cloud-b:", "--json", *cluster]) == 0
    listed = {d["address"]: d for d in json.loads(capsys.readouterr().out)}
    assert listed[f"cloud-b:{name}"]["version"] == 1
    assert listed[f"cloud-b:{name}"]["rows"] == 200
    assert main(["ls", f"cloud-b:{name}", "--files", *cluster]) == 0
    assert "_parts/" in capsys.readouterr().out

    assert main(["verify", f"cloud-b:{name}", *cluster]) == 0
    assert ": OK" in capsys.readouterr().out
    store = store_of(hr_cluster, f"cloud-b:{name}")
    part = DatasetStore(store).manifest().parts[0].path
    blob = bytearray(store.get(part))
    blob[100] ^= 0xFF
    store.put(part, bytes(blob))
    for extra in ([], ["--local"]):
        assert main(["verify", f"cloud-b:{name}", *extra, *cluster]) == 2
        err = capsys.readouterr().err
        assert f"cloud-b:{name}/{part}" in err and "sync --checksum" in err


@pytest.mark.slow
def test_refusal_and_bad_input_exit_2_with_one_clear_message(hr_cluster, onprem_root, name,
                                                              capsys):
    write_tickets(onprem_root / name, files=1, rows=10)
    cluster = ["--cluster", hr_cluster.name]
    assert main(["sync", f"onprem:{name}", f"cloud-b:{name}", *cluster]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress lines: one error line
    assert last.startswith("error: refusing to sync") and "[rule: residency] Fix:" in last
    assert "Traceback" not in err
    assert main(["sync", f"onprem:{name}-nope", f"onprem:{name}-copy", *cluster]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["ls", "nowhere:", *cluster]) == 2
    assert "unknown site 'nowhere'" in capsys.readouterr().err
