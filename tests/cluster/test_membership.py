"""Membership and drift without a cluster: which nodes belong, what drift is, how it compiles.

The real-cluster side (a rogue node that joins with the token, attach, admit) is in
``test_attach.py``; here are the rules themselves, the compiled selectors and the record.
"""

from __future__ import annotations

import json

import pytest

from hybridray import labels as L
from hybridray.cluster import attachment as A
from hybridray.cluster import membership as M
from hybridray.cluster.state import ClusterState, Member, NodeRecord, load_state, save_state
from hybridray.exceptions import ClusterError, ClusterNotFound, ConfigError
from hybridray.placement import compile as C
from hybridray.placement.capacity import Capacity
from hybridray.placement.policy import decide
from hybridray.placement.workload import Workload
from hybridray.topology import load_topology
from tests.paths import CLUSTERS

TOPO = load_topology(CLUSTERS / "local.yaml")
ROGUE = "f" * 56


def _labels(site: str, role: str = "worker", **extra: str) -> dict[str, str]:
    pool = None if role == "head" else TOPO.sites[site].pools[0]
    return {**L.node_labels(TOPO, site, pool, role=role), **extra}


def test_labels_as_hybridray_writes_them_fit_and_claims_beyond_the_site_do_not():
    for site in TOPO.sites:
        assert M.label_problems(TOPO, _labels(site)) == []
    assert M.label_problems(TOPO, _labels("onprem", role="head")) == []
    # lower than the site allows is fine: a node may hold less
    assert M.label_problems(TOPO, _labels("onprem", **{L.MAX_DATA_CLASS: "public"})) == []
    cases = {
        "site 'mars' is not in the topology": {L.SITE: "mars"},
        "above site cloud-a's confidential": {L.MAX_DATA_CLASS: "restricted"},
        "claims hybridray.io/site-kind=onprem": {L.SITE_KIND: "onprem"},
        "pool 'gpu' is not a pool of site cloud-a": {L.POOL: "gpu"},
        "which hybridray maps to site 'onprem'": {L.ZONE: "onprem"},
        "'secret' is not a data class": {L.MAX_DATA_CLASS: "secret"},
    }
    for want, change in cases.items():
        problems = M.label_problems(TOPO, _labels("cloud-a", **change))
        assert any(want in p for p in problems), (want, problems)
    spot = _labels("cloud-b", **{L.MARKET_TYPE: "on-demand"})
    assert "pool spot is spot" in " ".join(M.label_problems(TOPO, spot))
    gpu = _labels("onprem", **{L.ACCELERATOR: "H100"})
    assert "pool cpu has none" in " ".join(M.label_problems(TOPO, gpu))
    assert M.label_problems(TOPO, {}) == [f"no {L.SITE} label"]


def test_drift_is_every_live_non_member_and_every_member_that_claims_too_much():
    nodes = [M.LiveNode("a" * 56, _labels("onprem")),
             M.LiveNode(ROGUE, _labels("onprem")),                          # same labels
             M.LiveNode("b" * 56, _labels("cloud-a", **{L.MAX_DATA_CLASS: "restricted"})),
             M.LiveNode("c" * 56, _labels("onprem"), alive=False)]          # dead: ignored
    members = {"a" * 56, "b" * 56, "c" * 56}
    drift = {d.node_id: d for d in M.find_drift(TOPO, members, nodes)}
    assert set(drift) == {ROGUE, "b" * 56}
    assert drift[ROGUE].reasons[0].startswith("not a recorded member")
    assert "above site cloud-a's confidential" in drift["b" * 56].why
    # no record (a Cluster built by hand): labels alone decide
    assert [d.node_id for d in M.find_drift(TOPO, None, nodes)] == ["b" * 56]
    # ray.nodes() dicts are read the same way
    raw = [{"NodeID": ROGUE, "Alive": True, "Labels": _labels("onprem")}]
    assert [d.node_id for d in M.find_drift(TOPO, set(), raw)] == [ROGUE]


def test_admit_takes_fitting_nodes_refuses_overclaiming_ones_and_drops_dead_members():
    state = ClusterState(name="x", address="h:1", token_path="t", temp_dir="", home="",
                         members=[Member("d" * 56, "onprem")])
    nodes = [M.LiveNode("a" * 56, _labels("onprem")),
             M.LiveNode("b" * 56, _labels("cloud-a", **{L.MAX_DATA_CLASS: "restricted"})),
             M.LiveNode("d" * 56, _labels("onprem"), alive=False)]
    result = M.admit(state, TOPO, nodes, how="autoscaler")
    assert [m.node_id for m in result.admitted] == ["a" * 56]
    assert result.admitted[0].how == "autoscaler" and result.admitted[0].pool == "cpu"
    assert [m.node_id for m in result.pruned] == ["d" * 56]
    assert [d.node_id for d in result.drift] == ["b" * 56]
    assert state.member_ids() == {"a" * 56}
    # asked for by (prefix of) id: refused with the reason, never admitted
    result = M.admit(state, TOPO, nodes, node_ids=["bbbbbbbbbbbb"])
    assert result.admitted == [] and "above site" in result.refused[0].why
    with pytest.raises(ClusterError, match="matches no live node"):
        M.admit(state, TOPO, nodes, node_ids=["0123456789ab"])
    with pytest.raises(ClusterError, match="matches no live node"):
        M.admit(state, TOPO, nodes, node_ids=["ab"])          # too short to be unique


def test_every_compiled_selector_keeps_off_drift_nodes():
    wl = Workload(name="t", cpus=1, count=3, data_classes=("internal",))
    cap = Capacity.from_topology(TOPO, avoid={ROGUE: "not a recorded member"})
    placement = decide(TOPO, wl, cap)
    assert placement.avoid_nodes == (ROGUE,)
    assert placement.summary()["avoid_nodes"] == [ROGUE]
    excluded = f"!in({ROGUE})"
    opts = C.task_options(placement)
    assert opts["label_selector"][C.NODE_ID] == excluded
    assert len(opts["fallback_strategy"]) == 2       # Ray's fallbacks replace the primary,
    assert all(f["label_selector"][C.NODE_ID] == excluded for f in opts["fallback_strategy"])
    assert C.serve_options(placement)["ray_actor_options"]["label_selector"][C.NODE_ID] \
        == excluded
    assert C.data_remote_args(placement)["label_selector"][C.NODE_ID] == excluded
    assert all(s[C.NODE_ID] == excluded for s in C.train_label_selectors(placement, 3))
    assert C.job_submit_kwargs(placement)["entrypoint_label_selector"][C.NODE_ID] == excluded
    # without drift nothing names a node id (an autoscaler can satisfy every selector)
    clean = decide(TOPO, wl)
    assert C.NODE_ID not in C.task_options(clean)["label_selector"]
    assert "avoid_nodes" not in clean.summary()


def test_a_refusal_says_when_the_only_fitting_node_was_kept_off_as_drift():
    # a node Ray labelled with its GPU's type, in a pool that declares no accelerator: it
    # drifts, and "no alive node fits" alone sent a user hunting for a missing node
    node = "e" * 56
    free = {node: {"CPU": 2.0}}
    wl = Workload(name="t", cpus=2, data_classes=("restricted",))
    nodes = [{"NodeID": node, "Alive": True, "Resources": {"CPU": 2.0},
              "Labels": _labels("onprem", **{L.ACCELERATOR: "H200"})}]
    drift = M.find_drift(TOPO, None, nodes)
    cap = Capacity.from_ray(TOPO, avoid={d.node_id: d.why for d in drift}, nodes=nodes,
                            free=free)
    placement = decide(TOPO, wl, cap)
    assert not placement.ok
    message = placement.refusal.message
    assert "onprem: no alive node fits one unit (kept off 1 node(s) that drifted from the " \
           "topology: claims ray.io/accelerator-type=H200, pool cpu has none)" in message, message
    # the same node as hybridray labels it: no drift, placed
    nodes[0]["Labels"] = _labels("onprem")
    assert M.find_drift(TOPO, None, nodes) == []
    assert decide(TOPO, wl, Capacity.from_ray(TOPO, nodes=nodes, free=free)).ok


def test_records_from_before_membership_count_the_nodes_up_started(tmp_path):
    node = NodeRecord(key="onprem.cpu.0", site="onprem", pool="cpu", role="worker", index=0,
                      pid=1, pgid=1, start_time=1, log="", node_id="a" * 56)
    old = ClusterState(name="old", address="h:1", token_path="t", temp_dir="",
                       home=str(tmp_path), nodes=[node])
    (tmp_path / "clusters" / "old").mkdir(parents=True)
    data = old.to_json()
    for key in ("members", "origin", "dashboard_address"):
        data.pop(key)
    (tmp_path / "clusters" / "old" / "state.json").write_text(json.dumps(data))
    loaded = load_state("old", home=tmp_path)
    assert loaded.origin == "up" and loaded.member_ids() == {"a" * 56}


def _attached_record(home, name="far") -> ClusterState:
    state = ClusterState(name=name, address="127.0.0.1:1", token_path=str(home / "token"),
                         temp_dir="", home=str(home), origin="attach",
                         dashboard_address="http://127.0.0.1:1",
                         topology_snapshot=TOPO.model_dump(mode="json"),
                         members=[Member("a" * 56, "onprem")])
    (home / "clusters" / name).mkdir(parents=True)
    save_state(state)
    return state


def test_down_refuses_an_attached_cluster_and_detach_forgets_it_unreachable_or_not(tmp_path):
    from hybridray.cli import main
    from hybridray.cluster import detach, down, status

    _attached_record(tmp_path)
    (tmp_path / "token").write_text("x")
    with pytest.raises(ClusterError, match="hybridray detach far"):
        down("far", home=tmp_path)
    assert load_state("far", home=tmp_path).attached      # still recorded
    report = status("far", home=tmp_path)                 # GCS unreachable: reported, not raised
    assert report["state"] == "down" and "nothing answers" in report["gcs"]["error"]
    assert report["nodes"][0]["running"] is False and report["price_per_hour"] == 0
    detach("far", home=tmp_path)
    with pytest.raises(ClusterNotFound):
        load_state("far", home=tmp_path)
    assert (tmp_path / "token").exists()                  # the operator's token is theirs
    with pytest.raises(ClusterNotFound):
        detach("far", home=tmp_path)
    assert main(["detach", "never"]) == 2


def test_attach_refuses_bad_input_before_touching_anything(tmp_path, capsys):
    from hybridray.cli import main

    token = tmp_path / "token"
    token.write_text("ab" * 32)
    with pytest.raises(ClusterError, match="token file .* does not exist"):
        A.attach("x", "127.0.0.1:1", CLUSTERS / "local.yaml", token_path=tmp_path / "nope",
                 home=tmp_path)
    with pytest.raises(ClusterError, match="give the head's GCS as HOST:PORT"):
        A.attach("x", "no-port", CLUSTERS / "local.yaml", token_path=token, home=tmp_path)
    with pytest.raises(ConfigError, match="does-not-exist.yaml"):
        A.attach("x", "127.0.0.1:1", tmp_path / "does-not-exist.yaml", token_path=token,
                 home=tmp_path)
    with pytest.raises(ClusterNotFound, match="not a cluster name"):
        A.attach("Bad Name", "127.0.0.1:1", CLUSTERS / "local.yaml", token_path=token,
                 home=tmp_path)
    with pytest.raises(ClusterError, match="holds no trust.pem or ca.crt"):
        A.tls_from_dir(tmp_path)
    _attached_record(tmp_path, "taken")
    with pytest.raises(ClusterError, match="already attached"):
        A.attach("taken", "127.0.0.1:1", CLUSTERS / "local.yaml", token_path=token,
                 home=tmp_path)
    assert main(["admit", "taken"]) == 2                  # neither ids nor --all
    assert "name the nodes to admit" in capsys.readouterr().err


def test_a_launcher_adds_and_removes_members_before_they_register(tmp_path):
    from hybridray.cluster import add_members

    _attached_record(tmp_path, "elastic")         # its GCS is unreachable: recorded anyway
    add_members("elastic", [Member("e" * 56, "cloud-a", pool="cpu", how="autoscaler")],
                home=tmp_path)
    state = load_state("elastic", home=tmp_path)
    assert state.member_ids() == {"a" * 56, "e" * 56}
    assert state.members[-1].how == "autoscaler" and state.members[-1].admitted_at
    add_members("elastic", [], remove=["a" * 56], home=tmp_path)
    assert load_state("elastic", home=tmp_path).member_ids() == {"e" * 56}


def test_an_up_node_whose_ray_restarted_in_its_recorded_process_is_recognised():
    import os

    from hybridray.cluster.plan import NODE
    from hybridray.cluster.state import process_start_time

    me = os.getpid()        # stands in for the node's service loop: alive, ours
    rec = NodeRecord(key="cloud-b.spot.0", site="cloud-b", pool="spot", role="worker",
                     index=0, pid=me, pgid=me, start_time=process_start_time(me), log="",
                     temp_dir="/tmp/hr-x/3", node_id="a" * 56)
    state = ClusterState(name="n", address="h:1", token_path="t", temp_dir="", home="",
                         nodes=[rec], members=[Member("a" * 56, "cloud-b", rec.key)])
    labels = {**_labels("cloud-b"), NODE: rec.key}
    back = M.LiveNode("b" * 56, labels, temp_dir="/tmp/hr-x/3")             # new node id
    impostor = M.LiveNode("c" * 56, labels, temp_dir="/tmp/elsewhere")     # same key only
    assert [n.node_id for n in M.rejoined(state, [back, impostor])] == ["b" * 56]
    assert M.effective_members(state, [back, impostor]) == {"a" * 56, "b" * 56}
    assert [d.node_id for d in M.find_drift(TOPO, M.effective_members(state, [back, impostor]),
                                            [back, impostor])] == ["c" * 56]
    # ray.nodes() gives the temp dir through the object store socket's path
    raw = {"NodeID": "b" * 56, "Alive": True, "Labels": labels,
           "ObjectStoreSocketName": "/tmp/hr-x/3/session_2026/sockets/plasma_store"}
    assert M.live_nodes([raw])[0].temp_dir == "/tmp/hr-x/3"
    rec.start_time += 1     # the recorded process is gone (a recycled pid): not ours
    assert M.rejoined(state, [back]) == []
