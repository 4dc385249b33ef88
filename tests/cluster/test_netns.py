"""Namespace hosts: sites as hosts with their own addresses, shaped links, partition and heal.

Needs root and network namespaces (CI runs as root); elsewhere these tests skip with the one
reason. One namespace cluster is shared by the module: ``clusters/local.yaml`` as
``rehearsal`` in a HYBRIDRAY_HOME of its own, brought up, drilled and brought down by the bash
blocks of docs/deploy.md's rehearsal section, run as written. The doc's drill blocks cut
cloud-b and heal it once, while serving, training and a sync run through the cut. Every
namespace, link and qdisc of the machine is listed before and after: nothing may be left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hybridray.cluster import netns
from tests.paths import CLUSTERS, ROOT

REASON = netns.unsupported_reason()
needs_netns = pytest.mark.skipif(REASON is not None, reason=REASON or "")
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
NAME = "rehearsal"


def machine_network() -> dict[str, list]:
    """Every namespace, link and qdisc of this machine (not only ours)."""
    return {"netns": sorted(netns.netns_names()), "links": sorted(netns.link_names()),
            "qdiscs": sorted(netns.qdiscs())}


# ---- without a cluster ----------------------------------------------------------------------

def test_plan_gives_each_site_a_block_and_names_fit_interfaces():
    import ipaddress

    nodes = [("head", "onprem"), ("onprem.cpu.0", "onprem"), ("cloud-a.cpu.0", "cloud-a"),
             ("cloud-b.spot.0", "cloud-b"), ("cloud-b.spot.1", "cloud-b")]
    rec = netns.plan("hrabcde", ipaddress.ip_network("10.213.9.0/24"),
                     ["onprem", "cloud-a", "cloud-b"], nodes)
    assert rec.gateway == "10.213.9.1"
    for host in rec.hosts:  # each address lies in its own site's block
        assert ipaddress.ip_address(host.ip) in ipaddress.ip_network(rec.site_blocks[host.site])
    assert len({h.ip for h in rec.hosts}) == 5 and len({h.netns for h in rec.hosts}) == 5
    names = [rec.wan_bridge, *rec.site_bridges.values(), *(x for u in rec.uplinks.values()
                                                           for x in u),
             *(h.veth for h in rec.hosts)]
    assert all(len(n) <= 15 and n.startswith("hrabcde") for n in names)  # IFNAMSIZ
    assert netns.prefix_for("a", "/h1") != netns.prefix_for("a", "/h2") != \
        netns.prefix_for("b", "/h1")
    with pytest.raises(netns.NetnsError, match="at most 7 sites"):
        netns.plan("hrx", ipaddress.ip_network("10.213.9.0/24"), [f"s{i}" for i in range(8)],
                   [])


def test_up_without_root_is_one_clear_refusal(tmp_path):
    cmd = [sys.executable, "-m", "hybridray", "up", str(CLUSTERS / "local.yaml"),
           "--hosts", "netns", f"name={NAME}-nr"]
    if os.geteuid() == 0:  # drop to nobody to see what a user without root sees
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv is missing, so root cannot run the command as a plain user")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    env = {**os.environ, "HYBRIDRAY_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    os.chmod(tmp_path, 0o777)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "need root" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "home" / "clusters" / f"{NAME}-nr" / "state.json").exists()


def _transfer(rec, src_ns: str, dst_ip: str, mib: int, port: int = 5201) -> float:
    dst_ns = next(h.netns for h in rec.hosts if h.ip == dst_ip)
    return netns.transfer(src_ns, dst_ns, dst_ip, mib, port=port, timeout=20)


@needs_netns
def test_link_shaping_holds_a_real_transfer_to_the_link_rate_and_teardown_leaves_nothing():
    import ipaddress

    before = machine_network()
    prefix = netns.prefix_for("t-shape", str(os.getpid()))
    with netns.allocation_lock():
        rec = netns.plan(prefix, netns.free_subnet(), ["a", "b"], [("a.x.0", "a"),
                                                                   ("b.x.0", "b")])
        try:
            netns.Builder(rec).build()
            said = netns.shape(rec, [("a", "b", 40.0, 20.0), ("b", "a", 400.0, 20.0)])
            a, b = rec.host("a.x.0"), rec.host("b.x.0")
            assert ipaddress.ip_address(a.ip) in ipaddress.ip_network(rec.subnet)
            during = netns.inventory(prefix)
            assert len(during["netns"]) == 2 and len(during["links"]) == 9
            assert {q[0] for q in during["qdiscs"]} == {rec.uplinks["a"][0],
                                                        rec.uplinks["b"][0]}
            sent_before = netns.class_bytes(rec, "a", "b")
            slow = _transfer(rec, a.netns, b.ip, 12)
            assert netns.class_bytes(rec, "a", "b") - sent_before >= 12 * 2**20
            fast = _transfer(rec, b.netns, a.ip, 12, port=5202)  # the other direction
            # the token bucket holds the transfer to the link's rate (plus one burst)
            assert slow <= 40 * 1.15, slow
            assert fast > slow, (fast, slow)
            if not rec.netem:
                assert any("latency NOT applied" in line for line in said)
            # a cut link passes nothing; healed, it passes again
            netns.partition(rec, "b")
            with pytest.raises(netns.NetnsError):
                netns.transfer(a.netns, b.netns, b.ip, 1, port=5203, timeout=3)
            netns.heal(rec, "b")
            assert _transfer(rec, a.netns, b.ip, 1, port=5204) > 0
        finally:
            removed = netns.teardown(rec)
    assert set(removed) >= {a.netns, b.netns, rec.wan_bridge}
    assert machine_network() == before


# ---- one namespace cluster for the rest of the module -----------------------------------
# It is brought up, driven and brought down by the bash blocks of docs/deploy.md's section
# "Rehearse a deployment on one machine with namespaces", run as written, in order.

DOC = ROOT / "docs" / "deploy.md"


def doc_blocks() -> list[str]:
    text = DOC.read_text()
    section = text[text.index("## Rehearse a deployment on one machine with namespaces"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def run_block(block: str, env: dict, *, when: dict[str, float] | None = None) -> str:
    """Run a doc block as written; ``when`` maps a pattern to the time (epoch) of the first
    output line that matches it, filled in as the lines arrive."""
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        for pattern in when or {}:
            if when[pattern] is None and re.search(pattern, line):
                when[pattern] = time.time()
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    out = "".join(lines)
    assert proc.returncode == 0, f"{block}\n---\n{out[-3000:]}{stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def ns_cluster(tmp_path_factory):
    if REASON:
        pytest.skip(REASON)
    from hybridray.cluster import down, load_state
    from hybridray.exceptions import ClusterNotFound

    home = tmp_path_factory.mktemp("hrhome-netns")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           "HYBRIDRAY_HOME": str(home), "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    blocks = doc_blocks()
    assert len(blocks) == 6 and f"--hosts netns name={NAME}" in blocks[0]
    before = machine_network()
    try:
        out = run_block(blocks[0], env)   # hybridray up ... --hosts netns; status
        yield {"state": load_state(NAME, home=home), "before": before, "up": out,
               "home": home, "env": env, "blocks": blocks}
    finally:
        try:
            down(NAME, home=home)
        except ClusterNotFound:
            pass


def _status(name, home):
    from hybridray.cluster import status

    return status(name, home=home)


@needs_netns
@pytest.mark.slow
def test_every_node_is_a_host_of_its_own_started_by_the_rendered_script(ns_cluster):
    from hybridray.cluster.gcs import GcsView
    from hybridray.cluster.nshosts import host_tls, static_topology
    from hybridray.deploy.certs import cert_hosts
    from hybridray.deploy.common import RenderOptions
    from hybridray.deploy.render import build

    state = ns_cluster["state"]
    rec = netns.NetRecord.from_json(state.netns)
    assert len(rec.hosts) == 4 and len({h.ip for h in rec.hosts}) == 4
    with GcsView(state.address, state.token_path, state.tls) as gcs:
        seen = {n.key: n for n in gcs.nodes() if n.alive}
    for host in rec.hosts:
        # the node lives at its host's address, in its host's namespace
        assert seen[host.key].labels["hybridray.io/site"] == host.site
        node = next(n for n in state.nodes if n.key == host.key)
        inside = netns.run("ip", "netns", "identify", str(node.pid)).stdout.strip()
        assert inside == host.netns
        # its certificate names its own IP, and it runs the rendered script, unchanged
        assert host.ip in cert_hosts(host_tls(state, host)["RAY_TLS_SERVER_CERT"])
    with GcsView(state.address, state.token_path, state.tls) as gcs:
        infos = gcs._client.get_all_node_info(timeout=5)
    addresses = {dict(i.labels).get("hybridray.io/node"): i.node_manager_address
                 for i in infos.values() if i.state == 0}
    assert addresses == {h.key: h.ip for h in rec.hosts}
    render_dir = state.services["netns_render"]["dir"]
    rendered = build(static_topology(state.topology(), rec),
                     RenderOptions(head_address=state.address, tls=True))
    for key, script in state.services["netns_render"]["scripts"].items():
        assert open(f"{render_dir}/{script}").read() == rendered.files[script], key
    # token auth and TLS are on: a client without the cluster's certificate is refused
    probe = subprocess.run(
        [sys.executable, "-c", "import ray\nfrom ray._raylet import GcsClient\n"
         f"GcsClient(address='{state.address}', cluster_id=None)."
         "get_all_node_info(timeout=3)"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
             "RAY_gcs_rpc_server_reconnect_timeout_s": "3"},   # give up in seconds, not 40
        capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "Failed to connect to GCS" in probe.stderr, probe.stderr
    # the links as declared: bandwidth shaped, latency said plainly where it is not applied
    text = ns_cluster["up"]
    assert "link cloud-a -> cloud-b: 200 Mbit/s" in text
    assert rec.netem or "latency NOT applied" in text


@needs_netns
@pytest.mark.slow
def test_up_records_the_hosts_through_attachs_path(ns_cluster):
    """One record however the cluster came to be: members taken from the live nodes and
    checked against the topology, mirrored into the KV for the workers' guard, audited; a
    node whose labels claim more than its site may hold stops the recording."""
    import dataclasses

    from hybridray.audit import AuditLog
    from hybridray.cluster import attachment, mirror
    from hybridray.cluster.gcs import GcsView
    from hybridray.exceptions import ClusterError
    from hybridray.topology.models import Topology

    state, home = ns_cluster["state"], ns_cluster["home"]
    started = {n.node_id for n in state.nodes}
    assert len(started) == 4 and None not in started
    assert {m.node_id for m in state.members} == started
    assert {m.how for m in state.members} == {"up"} and state.origin == "up"
    with GcsView(state.address, state.token_path, state.tls) as gcs:
        doc = json.loads(gcs.kv_get(f"{mirror.RECORD_PREFIX}{NAME}"))
        assert set(doc["members"]) == started
        assert doc["topology"]["sites"]["cloud-b"]["storage"]["endpoint"].startswith(
            "http://10.213.")                      # the S3 server inside cloud-b's host
    (up_event,) = AuditLog.for_cluster(NAME, home).read("up")
    assert up_event["members"] == 4 and up_event["drift"] == 0 and up_event["tls"] is True
    # the same path with a topology that trusts cloud-b less than its node claims: refused
    stricter = state.topology().model_dump(mode="json")
    stricter["sites"]["cloud-b"]["max_data_class"] = "public"
    probe = dataclasses.replace(state, members=[])
    with pytest.raises(ClusterError, match=r"cloud-b\.spot\.0 .* do not fit .*above site "
                                           r"cloud-b's public"):
        attachment.enroll(probe, Topology.model_validate(stricter), node_ids=list(started),
                          how="up")


@needs_netns
@pytest.mark.slow
def test_a_transfer_between_sites_goes_through_its_link(ns_cluster):
    state = ns_cluster["state"]
    rec = netns.NetRecord.from_json(state.netns)
    a, b = rec.site_hosts("cloud-a")[0], rec.site_hosts("cloud-b")[0]
    sent = netns.class_bytes(rec, "cloud-a", "cloud-b")
    rate = _transfer(rec, a.netns, b.ip, 8)
    assert netns.class_bytes(rec, "cloud-a", "cloud-b") - sent >= 8 * 2**20
    assert rate <= 200 * 1.15, rate


def _alert_tests(scrape: str, cluster: str) -> tuple[dict, dict]:
    """A promtool test that evaluates every alert expression on this scrape held for 10 min."""
    series = []
    for line in scrape.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            series.append({"series": name_labels, "values": f"{float(value):g}x40"})
    series.append({"series": 'up{job="hybridray",instance="exporter"}', "values": "1x40"})
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return series, rules


def _promtool(tmp_path, series, tests) -> subprocess.CompletedProcess:
    doc = {"rule_files": [str(ALERTS)], "evaluation_interval": "15s",
           "tests": [{"interval": "15s", "input_series": series, **tests}]}
    path = tmp_path / "alerts-test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)


@needs_netns
@pytest.mark.slow
def test_the_doc_shows_where_nodes_run_and_a_driver_on_the_head(ns_cluster):
    rec = netns.NetRecord.from_json(ns_cluster["state"].netns)
    out = run_block(ns_cluster["blocks"][1], ns_cluster["env"])   # env; ip netns list
    assert f"export HYBRIDRAY_HEAD_NETNS={rec.host('head').netns}" in out
    assert f"{rec.host('head').netns} " in out
    out = run_block(ns_cluster["blocks"][2], ns_cluster["env"])   # a driver on the head
    assert out.strip().splitlines()[-1] == repr(sorted(h.ip for h in rec.hosts))


@needs_netns
@pytest.mark.slow
def test_the_doc_drill_cuts_cloud_b_under_serving_training_and_sync(ns_cluster, tmp_path):
    """The doc's drill blocks cut cloud-b under load and heal it, in one window: the rest
    keeps working, nothing is lost, and serving returns to cloud-b."""
    from hybridray import metrics
    from hybridray.cluster.nshosts import driver_argv
    from hybridray.cluster.ports import free_ports
    from hybridray.cluster.status import ray_env
    from hybridray.commands.fault import heal
    from hybridray.storage.fs import parse_address
    from hybridray.topology.models import Topology
    from tests.serve.checkpoints import make_checkpoint

    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: apt-get install prometheus (.ci/run does)")
    state, hybridray_home = ns_cluster["state"], ns_cluster["home"]
    blocks = ns_cluster["blocks"]
    # the cluster's own topology as up resolved it (its storage roots, its endpoints)
    topology = Topology.model_validate(state.topology_snapshot)
    _, path = parse_address("cloud-a:checkpoints/drill", topology).resolve(topology)
    make_checkpoint(f"{path}/checkpoint_000001", data_class="internal", site="cloud-a",
                    steps=40, cluster=NAME, home=hybridray_home)
    env = {**os.environ, **ray_env(state), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_AUTH_TOKEN", None)
    proc = subprocess.Popen(
        driver_argv(state, [sys.executable, "-m", "tests.cluster.netns_drill_driver", NAME,
                            str(free_ports(1)[0]), str(tmp_path)]),
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=open(tmp_path / "driver.err", "w"), text=True)
    seen: dict[str, dict] = {}

    def until(phase: str) -> dict:
        for line in proc.stdout:
            if line.startswith("PHASE "):
                name, info = line[6:].split(" ", 1)
                seen[name] = json.loads(info)
                if name == phase:
                    return seen[name]
            elif line.startswith("RESULT "):
                seen["RESULT"] = json.loads(line[7:])
                if phase == "RESULT":
                    return seen["RESULT"]
                pytest.fail(f"driver ended before {phase}: {seen['RESULT']}")
        pytest.fail(f"driver exited before {phase}: "
                    f"{(tmp_path / 'driver.err').read_text()[-3000:]}")

    def tell(line: str) -> None:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()

    cut = healed = False
    try:
        loaded = until("loaded")
        cut_at = time.time()
        cut = True
        dead = r"the GCS sees cloud-b's nodes dead [\d.]+s after the cut"
        when = {dead: None}
        out = run_block(blocks[3], ns_cluster["env"], when=when)  # partition; status; metrics
        assert re.search(dead, out), out
        dead_at = when[dead]            # by then the GCS had declared cloud-b's node dead
        # pools column skipped; 0 of 1 node alive
        assert re.search(r"cloud-b\s*│\s*cloud\s*│[^│\n]*│\s*0/1", out), out
        assert f'hybridray_site_up{{cluster="{NAME}",site="cloud-b",kind="cloud"}} 0' in out
        # status: cloud-b lost, the rest running
        report = _status(NAME, hybridray_home)
        assert report["state"] == "degraded" and report["partitioned"] == ["cloud-b"]
        assert {s: v["alive"] for s, v in report["sites"].items()} == {
            "onprem": 2, "cloud-a": 1, "cloud-b": 0}
        # the shipped alert rules on the exporter's output, by Prometheus's own rule engine
        scrape = metrics.render(NAME, home=hybridray_home)
        series, rules = _alert_tests(scrape, NAME)
        lab = {"cluster": NAME, "site": "cloud-b", "kind": "cloud"}
        exprs = []
        for rule in rules:
            firing = rule["alert"] == "HybridraySiteUnreachable"
            exprs.append({"expr": rule["expr"], "eval_time": "10m",
                          "exp_samples": [{"labels": "hybridray_site_up" + "{" + ",".join(
                              f'{k}="{v}"' for k, v in lab.items()) + "}", "value": 0}]
                          if firing else []})
        result = _promtool(tmp_path, series, {"promql_expr_test": exprs})
        assert result.returncode == 0, result.stdout + result.stderr
        tell("cut")
        checked = until("cut-checked")
        healed_at = time.time()
        healed = True
        out = run_block(blocks[4], ns_cluster["env"])   # heal --wait; status
        assert re.search(r"cloud-b's nodes are back, alive in the GCS, [\d.]+s after", out), out
        assert re.search(r"cloud-b\s*│\s*cloud\s*│[^│\n]*│\s*1/1", out), out    # back
        report = _status(NAME, hybridray_home)
        assert report["state"] == "up" and report["partitioned"] == [], report["sites"]
        # the node that came back is the host's own, recognised and recorded as a member
        assert report["drift"] == [], report["drift"]
        tell("healed")
        until("RESULT")
    finally:
        if cut and not healed:
            heal(NAME, "cloud-b", home=hybridray_home)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
    r = seen.get("RESULT", {})
    assert "crashed" not in r, r.get("crashed")
    # the sync into the cut site failed cleanly; v1 stayed current and verifies; v2 after heal
    assert checked["sync_error"] is not None, checked
    assert r["after_cut"] == {"version": r["v1"]["version"], "verified": True}
    assert r["v2"] == {"version": r["v1"]["version"] + 1, "outcome": "committed"}
    # serving: >= 99 % answered (one client retry), no wrong body, the rest answered
    stats = r["stats"]
    asked = sum(v for k, v in stats.items() if k.endswith((":answered", ":failed")))
    assert sum(v for k, v in stats.items() if k.endswith(":answered")) >= 0.99 * asked, r
    assert not any(k.endswith(":wrong") for k in stats), r
    assert r["answered"]["cut"] and set(r["answered"]["cut"]) <= {"cloud-a"}, r["answered"]
    assert r["answered"]["healed"].get("cloud-b", 0) > 0, r["answered"]      # back there
    # training on-prem ran through the cut: every step, no restart
    t = r["training"]
    assert t["ok"] and t["steps"] == t["planned"] and t["restarts"] == 0 \
        and t["attempts"] == 1, t
    assert t["sites"] == ["onprem"]
    assert loaded["training_step"] >= 5, loaded            # stepping when the link was cut
    assert checked["at_verdict"]["alive"], (checked, t)    # ... and still when cloud-b was dead
    # ... and it was still running when the GCS declared cloud-b's node dead
    assert t["started"] < cut_at < dead_at < t["ended"] < healed_at, \
        (t, cut_at, dead_at, healed_at)


@needs_netns
@pytest.mark.slow
def test_the_doc_down_leaves_nothing_behind(ns_cluster):
    state = ns_cluster["state"]
    prefix = netns.NetRecord.from_json(state.netns).prefix
    assert netns.inventory(prefix)["netns"]
    out = run_block(ns_cluster["blocks"][5], ns_cluster["env"])   # down
    assert "stopped cluster 'rehearsal': 4 node process(es)" in out
    assert netns.inventory(prefix) == {"netns": [], "links": [], "qdiscs": []}
    assert machine_network() == ns_cluster["before"]
    assert not (state.state_dir / "secrets").exists()             # its keys went with it
