"""A cluster's storage is its own: shipped files name the cluster in every root, and ``up``
refuses a cluster whose roots another cluster uses (no Ray needed: the checks run first)."""

from __future__ import annotations

import json

import pytest

from hybridray.cluster.roots import OWNER_FILE, check_storage_is_own, claim_storage
from hybridray.cluster.state import ClusterState, save_state
from hybridray.exceptions import ClusterError
from hybridray.topology import load_topology
from hybridray.topology.models import Storage
from tests.paths import CLUSTERS

SHIPPED = sorted(CLUSTERS.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_file_gives_each_cluster_name_roots_of_its_own(path, monkeypatch):
    # A shell that ran `eval "$(hybridray env local)"` exports HYBRIDRAY_CLUSTER=local;
    # the topology's own name must win, or the demo would write into the user's cluster.
    monkeypatch.setenv("HYBRIDRAY_CLUSTER", "local")
    a = load_topology(path, ["name=alpha"])
    b = load_topology(path, ["name=beta"])
    for site in a.sites:
        ra, rb = a.sites[site].storage.root, b.sites[site].storage.root
        assert "alpha" in ra and "beta" in rb and "local" not in ra.split("://")[1]
        assert ra != rb and not rb.startswith(ra + "/") and not ra.startswith(rb + "/")


def test_the_cluster_variable_outside_a_topology_is_an_error():
    with pytest.raises(ValueError, match="HYBRIDRAY_CLUSTER"):
        Storage(root="file:///data/${HYBRIDRAY_CLUSTER}")


def _topology(tmp_path, name, root):
    return load_topology(CLUSTERS / "local.yaml", [
        f"name={name}", f"sites.onprem.storage.root=file://{root}/onprem",
        f"sites.cloud-a.storage.root=file://{root}/cloud-a"])


def test_a_root_owned_by_another_cluster_is_refused_even_after_it_is_down(tmp_path):
    home = tmp_path / "home"
    user = _topology(tmp_path, "local", tmp_path / "shared")
    check_storage_is_own(user, home)
    claim_storage(user, home)
    owner = tmp_path / "shared/onprem" / OWNER_FILE
    assert json.loads(owner.read_text())["cluster"] == "local"
    check_storage_is_own(user, home)                      # the same cluster again: fine
    demo = _topology(tmp_path, "demo", tmp_path / "shared")
    with pytest.raises(ClusterError, match=r"cluster 'local'.*HYBRIDRAY_CLUSTER"):
        check_storage_is_own(demo, home)
    nested = _topology(tmp_path, "demo", tmp_path / "shared/onprem/sub")  # inside its root
    with pytest.raises(ClusterError, match="inside the storage of cluster 'local'"):
        check_storage_is_own(nested, home)
    check_storage_is_own(_topology(tmp_path, "demo", tmp_path / "other"), home)


def test_a_root_overlapping_a_recorded_cluster_is_refused(tmp_path):
    home = tmp_path / "home"
    user = _topology(tmp_path, "local", tmp_path / "data")
    (home / "clusters/local").mkdir(parents=True)
    save_state(ClusterState(name="local", address="127.0.0.1:1", token_path="t",
                            temp_dir="/tmp/x", home=str(home),
                            topology_snapshot=user.model_dump(mode="json")))
    outer = load_topology(CLUSTERS / "local.yaml", [   # no owner file: only the record tells
        "name=other", f"sites.onprem.storage.root=file://{tmp_path}/data",
        f"sites.cloud-a.storage.root=file://{tmp_path}/elsewhere"])
    with pytest.raises(ClusterError, match=r"overlaps cluster 'local'"):
        check_storage_is_own(outer, home)


def test_attach_refuses_a_root_another_cluster_uses_before_probing_anything(tmp_path):
    """``attach`` checks storage as ``up`` does, first: the address here answers nothing,
    and the refusal is about the root, not the address."""
    from hybridray.cluster.attachment import attach

    home = tmp_path / "home"
    user = _topology(tmp_path, "local", tmp_path / "shared")
    claim_storage(user, home)
    (tmp_path / "token").write_text("x" * 32)
    with pytest.raises(ClusterError, match=r"inside the storage of cluster 'local'"):
        attach("theirs", "127.0.0.1:1", _topology(tmp_path, "theirs", tmp_path / "shared"),
               token_path=tmp_path / "token", home=home)
    assert not (home / "clusters" / "theirs").exists()
    with pytest.raises(ClusterError, match="nothing answers"):   # its own roots: it probes
        attach("theirs", "127.0.0.1:1", _topology(tmp_path, "theirs", tmp_path / "own"),
               token_path=tmp_path / "token", home=home)
