"""``hybridray up/down/status/env``: real multi-site Ray clusters on one machine.

The first tests need no cluster (planning, ports, state, process identity). The ``slow`` ones
start real clusters from ``clusters/local.yaml`` (see ``conftest.py``) and talk to them the way
a user does: separate driver processes, ``ray job submit``, the CLI.

    pytest -x tests/cluster -q
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hybridray.cli import main
from hybridray.cluster import (
    ClusterState,
    NodeRecord,
    down,
    elastic,
    list_clusters,
    load_state,
    local,
    ray_env,
    startup,
    status,
    up,
)
from hybridray.cluster.gcs import GcsView
from hybridray.cluster.local import MAX_SOCKET_PATH, SOCKET_SUFFIX, _ray_temp_dir, _stop_nodes
from hybridray.cluster.plan import NODE, plan_nodes, ray_start_args
from hybridray.cluster.ports import check_pinned, free_ports
from hybridray.cluster.state import process_start_time, save_state
from hybridray.exceptions import ClusterError, ClusterNotFound
from hybridray.labels import MAX_DATA_CLASS, SITE, SITE_KIND, ZONE
from hybridray.topology import load_topology
from tests.cluster.conftest import (
    LOCAL_YAML,
    driver_json,
    processes_mentioning,
    run_driver,
    start,
    temp_prefix,
)
from tests.paths import CLUSTERS

PRICES = {"onprem": 0.40, "cloud-a": 0.34, "cloud-b": 0.11}


def _pid_gone(pid: int) -> bool:
    return process_start_time(pid) is None  # no such process, or only a zombie


# ---- no cluster needed --------------------------------------------------------------------

def test_plan_for_local_yaml_is_head_plus_one_node_per_site():
    topology = load_topology(LOCAL_YAML)
    specs = plan_nodes(topology)
    assert [s.key for s in specs] == ["head", "onprem.cpu.0", "cloud-a.cpu.0", "cloud-b.spot.0"]
    head, onprem, _, cloud_b = specs
    assert (head.role, head.site, head.cpus, head.memory_bytes) == ("head", "onprem", 0, None)
    assert head.labels[NODE] == "head" and head.resources == {"site:onprem": 1000.0}
    assert onprem.cpus == 2 and onprem.memory_bytes == 2 * 2**30
    assert onprem.object_store_bytes == 100 * 2**20
    assert cloud_b.labels["ray.io/market-type"] == "spot" and cloud_b.price_per_hour == 0.11
    ports = {"gcs": 1, "dashboard": 2, "client_server": 3}
    args = ray_start_args(cloud_b, temp_dir="/tmp/x", gcs_address="h:1", ports=ports,
                          agent_port=4)
    assert args[args.index("--address") + 1] == "h:1"
    assert args[args.index("--resources") + 1] == '{"site:cloud-b":1000.0}'
    assert "hybridray.io/site=cloud-b" in args[args.index("--labels") + 1]
    assert "--head" not in args and args[args.index("--dashboard-agent-listen-port") + 1] == "4"
    head_args = ray_start_args(head, temp_dir="/tmp/x", gcs_address=None, ports=ports,
                               agent_port=5, dashboard=False)
    assert head_args[head_args.index("--port") + 1] == "1"
    assert head_args[head_args.index("--include-dashboard") + 1] == "false"
    assert head_args[head_args.index("--dashboard-port") + 1] == "2"


def test_non_local_sites_are_refused_unless_simulated():
    topology = load_topology(CLUSTERS / "onprem-aws.yaml")
    with pytest.raises(ClusterError, match="hybridray render.*--simulate") as e:
        plan_nodes(topology)
    assert "onprem (static)" in str(e.value) and "aws (aws)" in str(e.value)
    specs = plan_nodes(topology, simulate=True)
    pools = {(s.site, s.pool) for s in specs if s.role == "worker"}
    assert len(pools) == len(specs) - 1 == 5  # one node per pool, also for min: 0 pools
    assert all(s.cpus <= 2 and s.object_store_bytes == 100 * 2**20 for s in specs)
    h100 = next(s for s in specs if s.pool == "h100")
    assert h100.gpus == 8 and h100.labels["ray.io/accelerator-type"] == "H100"


def test_fractional_cpus_are_refused_with_the_key():
    topology = load_topology(LOCAL_YAML, ["sites.cloud-a.pools.0.cpus=1.5"])
    with pytest.raises(ClusterError, match=r"sites\.cloud-a\.pools\[0\]\.cpus.*1\.5"):
        plan_nodes(topology)


def test_ray_temp_dir_is_short_and_differs_per_home(tmp_path):
    root = _ray_temp_dir("local", tmp_path, 4)
    assert root.startswith(temp_prefix("local"))
    assert root != _ray_temp_dir("local", tmp_path / "other-home", 4)
    assert root == _ray_temp_dir("local", tmp_path, 4)  # stable, so down finds it again
    long_name = "a" * 32
    long_root = _ray_temp_dir(long_name, tmp_path / ("h" * 200), 100)
    assert len(f"{long_root}/99") + SOCKET_SUFFIX <= MAX_SOCKET_PATH
    assert long_root != _ray_temp_dir("a" * 31 + "b", tmp_path / ("h" * 200), 100)


def test_pinned_ports_are_checked():
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ClusterError, match=f"--port {port}: port {port} is already in use"):
            check_pinned({"--port": port})
    with pytest.raises(ClusterError, match="both 7000"):
        check_pinned({"--port": 7000, "--dashboard-port": 7000})
    with pytest.raises(ClusterError, match="not a TCP port"):
        check_pinned({"--dashboard-port": 70000})
    free = free_ports(3)
    assert len(set(free)) == 3
    check_pinned({"--port": free[0], "--dashboard-port": None})  # a free port passes


def _fake_state(home, name: str, nodes: list[NodeRecord]) -> ClusterState:
    state = ClusterState(name=name, address="127.0.0.1:1", token_path=str(home / "nope"),
                         temp_dir=f"/tmp/hr-{os.getuid()}-{name}", home=str(home),
                         ports={"gcs": 1, "dashboard": 2}, nodes=nodes)
    state.state_dir.mkdir(parents=True, exist_ok=True)
    save_state(state)
    return state


def test_state_round_trips_and_unknown_names_list_known_clusters(tmp_path, monkeypatch):
    node = NodeRecord(key="head", site="onprem", pool=None, role="head", index=0, pid=1,
                      pgid=1, start_time=1, log="x")
    state = _fake_state(tmp_path, "rt", [node])
    assert list_clusters(tmp_path) == ["rt"]
    assert [p.name for p in state.state_dir.iterdir()] == ["state.json"]  # no temp file left
    loaded = load_state("rt", home=tmp_path)
    assert loaded == state and loaded.dashboard_url == "http://127.0.0.1:2"
    with pytest.raises(ClusterNotFound, match=r"no cluster named 'nope'.*recorded clusters: rt"):
        load_state("nope", home=tmp_path)
    with pytest.raises(ClusterNotFound, match="not a cluster name"):
        load_state("../etc", home=tmp_path)
    monkeypatch.setenv("HYBRIDRAY_HOME", str(tmp_path))
    assert main(["down", "nope"]) == 2  # one-line error, exit 2
    assert not (tmp_path / "clusters" / ".nope.lock").exists()  # an unknown name leaves no trace


def test_a_recycled_pid_is_never_signalled(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        real = process_start_time(sleeper.pid)
        assert real is not None
        impostor = NodeRecord(key="head", site="s", pool=None, role="head", index=0,
                              pid=sleeper.pid, pgid=sleeper.pid, start_time=real - 1, log="x")
        assert not impostor.leader_alive() and impostor.group() == [] and not impostor.alive()
        assert _stop_nodes([impostor], timeout=1) == []
        assert sleeper.poll() is None  # the stranger's process was left alone
        ours = NodeRecord(**{**impostor.__dict__, "start_time": real})
        assert ours.alive()
        assert _stop_nodes([ours], timeout=5) == [sleeper.pid]
        assert _pid_gone(sleeper.pid) and not ours.alive()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_stopping_a_node_also_stops_what_it_started_outside_its_group():
    """Serve's HAProxy runs in a session of its own; it must not outlive the node."""
    import time

    from hybridray.cluster.state import descendants

    leader = subprocess.Popen(["bash", "-c", "setsid sleep 61 & exec sleep 60"],
                              start_new_session=True)
    try:
        for _ in range(50):
            below = descendants([leader.pid])
            if below:
                break
            time.sleep(0.1)
        [(child, _)] = below.items()
        assert os.getpgid(child) != leader.pid                  # outside the node's group
        node = NodeRecord(key="head", site="s", pool=None, role="head", index=0,
                          pid=leader.pid, pgid=leader.pid,
                          start_time=process_start_time(leader.pid), log="x")
        assert _stop_nodes([node], timeout=5) == [leader.pid]
        for _ in range(50):
            if _pid_gone(child):
                break
            time.sleep(0.1)
        assert _pid_gone(child) and _pid_gone(leader.pid)
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_an_haproxy_orphaned_before_down_is_still_stopped(tmp_path):
    """Serve's HAProxy outlives its manager actor in a graceful stop of up to 120 s, and by
    then it is no node's descendant; it runs with the config the cluster gave its head, and
    that path names the cluster's temp dir."""
    from hybridray.cluster.startup import haproxy_env
    from hybridray.cluster.state import ClusterState

    temp_dir = str(tmp_path / "hr-0-x")
    state = ClusterState(name="x", address="a:1", token_path="t", temp_dir=temp_dir,
                         home=str(tmp_path), ports={"haproxy_metrics": 40001,
                                                    "haproxy_stats": 40002})
    env = haproxy_env(state)
    assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == f"{temp_dir}/haproxy/haproxy.cfg"
    assert env["RAY_SERVE_HAPROXY_METRICS_PORT"] == "40001"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "40002"
    assert haproxy_env(ClusterState(name="x", address="a:1", token_path="t", temp_dir="d",
                                    home="h", ports={"gcs": 1})) == {}   # older clusters

    config = f"{temp_dir}/haproxy/0123abcd/haproxy.cfg"
    sleep = [sys.executable, "-c", "import time; time.sleep(60)", "-f"]
    orphan = subprocess.Popen([*sleep, config], start_new_session=True)
    stranger = subprocess.Popen([*sleep, f"{tmp_path}/other/haproxy/haproxy.cfg"],
                                start_new_session=True)
    try:
        assert _stop_nodes([], timeout=1, temp_dir=temp_dir) == []
        assert orphan.wait(timeout=5) == -signal.SIGKILL
        assert stranger.poll() is None          # another cluster's (or nobody's) is left alone
    finally:
        for proc in (orphan, stranger):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_up_forgets_a_cluster_whose_processes_all_died(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    ghost = NodeRecord(key="head", site="onprem", pool=None, role="head", index=0,
                       pid=dead.pid, pgid=dead.pid, start_time=1, log="x")
    _fake_state(tmp_path, "ghost", [ghost])
    assert list_clusters(tmp_path) == ["ghost"]
    with socket.socket() as busy:  # makes up stop right after it dealt with the stale state
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ClusterError, match=f"port {port} is already in use"):
            up(load_topology(LOCAL_YAML, ["name=ghost"]), home=tmp_path, port=port)
    assert list_clusters(tmp_path) == []  # stale state was cleaned, nothing was started
    assert processes_mentioning(temp_prefix("ghost")) == []


def test_a_worker_that_gave_up_while_starting_is_retried_once(tmp_path, monkeypatch):
    fake_ray = tmp_path / "fake-ray"  # stands in for `ray` and fails the way Ray does
    fake_ray.write_text("#!/bin/sh\necho \"$FAKE_RAY_SAYS\"\nexit 1\n")
    fake_ray.chmod(0o755)
    monkeypatch.setattr(startup, "_ray_command", lambda: [str(fake_ray)])
    state = _fake_state(tmp_path, "retry", [])
    state.temp_dir = str(tmp_path / "ray")
    os.mkdir(state.temp_dir)
    (state.state_dir / "logs").mkdir()
    worker = plan_nodes(load_topology(LOCAL_YAML))[1]
    said: list[str] = []
    run = startup.Startup(state, timeout=30, say=said.append)

    monkeypatch.setenv("FAKE_RAY_SAYS", "Exception: The current node timed out during startup.")
    run._launch(worker)
    first_pid = state.nodes[0].pid
    run.procs[worker.key].wait()
    run._check_exits({worker.key: worker})  # transient: relaunched
    assert "exited while starting" in said[0] and said[0].endswith("retrying")
    assert state.nodes[0].pid != first_pid and len(state.nodes) == 1
    run.procs[worker.key].wait()
    with pytest.raises(ClusterError, match="onprem/cpu#0 exited with code 1 while starting"):
        run._check_exits({worker.key: worker})  # only once
    assert "--- hybridray: attempt 2 ---" in open(state.nodes[0].log).read()

    monkeypatch.setenv("FAKE_RAY_SAYS", "ValueError: object store too large")
    state.temp_dir = str(tmp_path / "ray2")
    os.mkdir(state.temp_dir)
    again = startup.Startup(state, timeout=30, say=said.append)
    other = plan_nodes(load_topology(LOCAL_YAML))[2]
    again._launch(other)
    again.procs[other.key].wait()
    with pytest.raises(ClusterError, match="object store too large"):
        again._check_exits({other.key: other})  # a configuration error is not retried
    assert len(said) == 1


def test_a_head_whose_dashboard_was_late_counts_as_a_slow_start(tmp_path):
    """Ray's own words when the head's dashboard missed RAY_DASHBOARD_STARTUP_TIMEOUT_S (seen
    with RAY_DASHBOARD_STARTUP_TIMEOUT_S=0), followed by more than the tail shown in errors."""
    state = _fake_state(tmp_path, "late", [])
    (state.state_dir / "logs").mkdir()
    head = NodeRecord(key="head", site="onprem", pool=None, role="head", index=0, pid=1,
                      pgid=1, start_time=1, log=str(state.state_dir / "logs" / "head.log"),
                      temp_dir=str(tmp_path / "none"))
    state.nodes.append(head)
    run = startup.Startup(state, timeout=30, say=lambda line: None)
    late = ("2026-12-04 20:36:43,680\tERROR services.py:1431 -- Failed to start the dashboard \n"
            + "".join(f'  File "services.py", line {i}, in start_api_server\n'
                      for i in range(60)) + "Exception: Failed to read dashboard.err file\n")
    Path(head.log).write_text(late)
    assert run.failure("head", "exited with code 1 while starting").ray_gave_up
    Path(head.log).write_text(late.replace("dashboard \n", "dashboard , return code 1\n"))
    assert not run.failure("head", "exited with code 1 while starting").ray_gave_up  # crashed


def test_a_start_that_ray_gave_up_on_is_repeated_once_on_fresh_ports(tmp_path, monkeypatch):
    state = _fake_state(tmp_path, "again", [])
    state.temp_dir = str(tmp_path / "ray")
    os.makedirs(f"{state.temp_dir}/0")
    state.ports = {"gcs": 7001, "dashboard": 7002}
    runs: list[dict] = []

    class FlakyStartup:  # the first start hits one of Ray's own deadlines, the second works
        def __init__(self, state, **_):
            self.state = state

        def run(self, specs):
            runs.append(dict(self.state.ports))
            if len(runs) == 1:
                error = ClusterError("cluster 'again': head exited with code 1 while starting")
                error.ray_gave_up = True
                raise error

    monkeypatch.setattr(local, "Startup", FlakyStartup)
    said: list[str] = []
    topology = load_topology(CLUSTERS / "elastic.yaml")   # elastic pools: an autoscaler config
    pools = elastic.elastic_pools(topology)
    local._start_nodes(state, [], timeout=5, say=said.append, pinned={7002},
                       topology=topology, pools=pools)
    assert len(runs) == 2 and "starting the cluster once more" in said[0]
    assert runs[1]["dashboard"] == 7002  # pinned by the user: kept
    assert runs[1]["gcs"] not in (7001, 7002) and state.address.endswith(f":{runs[1]['gcs']}")
    assert os.listdir(state.temp_dir) == []  # the first start's Ray dirs are gone
    # Ray's autoscaler of the second start is told the second start's GCS address
    config = json.loads((state.state_dir / elastic.CONFIG_FILE).read_text())
    assert config["provider"]["gcs_address"] == state.address

    class BrokenStartup(FlakyStartup):  # a failure of the node's own making
        def run(self, specs):
            runs.append(dict(self.state.ports))
            raise ClusterError("cluster 'again': node onprem/cpu#0 exited: bad config")

    monkeypatch.setattr(local, "Startup", BrokenStartup)
    runs.clear()
    with pytest.raises(ClusterError, match="bad config"):
        local._start_nodes(state, [], timeout=5, say=said.append, pinned=set(),
                           topology=topology, pools=[])
    assert len(runs) == 1  # not repeated


# ---- real clusters ------------------------------------------------------------------------

NODES_CODE = """
ray.init(address=ADDRESS, log_to_driver=False)
print(json.dumps([{"id": n["NodeID"], "alive": n["Alive"], "labels": n["Labels"],
                   "resources": n["Resources"]} for n in ray.nodes()]))
"""


SWITCH_CODE = """
from hybridray.cluster import apply_env, load_state, ray_env

@ray.remote(num_cpus=1, label_selector={{"hybridray.io/site": "cloud-a"}})
def labels_of_node():
    labels = ray.get_runtime_context().get_node_labels()
    return [labels["hybridray.io/cluster"], labels["hybridray.io/site"]]

seen = []
for name in {names!r}:
    state = load_state(name, home={home!r})
    apply_env(ray_env(state))
    ray.init(address=state.address, log_to_driver=False)
    seen.append(ray.get(labels_of_node.remote(), timeout=120))
    ray.shutdown()
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_every_node_carries_its_site_labels_resource_and_cpus(module_cluster):
    topology = module_cluster.topology()
    nodes = [n for n in driver_json(run_driver(module_cluster, NODES_CODE)) if n["alive"]]
    assert len(nodes) == 4
    by_key = {n["labels"][NODE]: n for n in nodes}
    assert set(by_key) == {rec.key for rec in module_cluster.nodes}
    for rec in module_cluster.nodes:
        node = by_key[rec.key]
        site = topology.sites[rec.site]
        assert node["id"] == rec.node_id
        assert node["labels"][SITE] == rec.site
        assert node["labels"][SITE_KIND] == site.kind.value
        assert node["labels"][MAX_DATA_CLASS] == site.max_data_class.value
        assert node["labels"][ZONE] == rec.site
        assert node["resources"][f"site:{rec.site}"] == 1000
        expected_cpus = 0 if rec.role == "head" else site.pools[0].cpus
        assert node["resources"].get("CPU", 0) == expected_cpus
        if rec.role != "head":
            assert node["resources"]["memory"] == site.pools[0].memory_gb * 2**30
            assert node["resources"]["object_store_memory"] == 100 * 2**20


@pytest.mark.slow
def test_a_driver_without_the_token_is_refused(module_cluster):
    proc = run_driver(module_cluster, NODES_CODE, token=False, timeout=90)
    assert proc.returncode != 0
    assert "InvalidAuthToken" in proc.stderr or "Authentication" in proc.stderr, proc.stderr[-3000:]
    token = open(module_cluster.token_path).read()
    assert len(token) == 64 and oct(os.stat(module_cluster.token_path).st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_status_shows_three_sites_the_head_and_prices(module_cluster, home, monkeypatch, capsys):
    report = status(module_cluster.name, home=home)
    assert report["state"] == "up" and report["gcs"]["reachable"]
    assert list(report["sites"]) == ["onprem", "cloud-a", "cloud-b"]
    assert [n["role"] for n in report["nodes"]].count("head") == 1
    assert all(n["process_alive"] and n["gcs_alive"] for n in report["nodes"])
    for site, price in PRICES.items():
        s = report["sites"][site]
        assert s["price_per_hour"] == pytest.approx(price)
        assert s["cpus_total"] == 2 and s["cpus_used"] == 0
        assert s["alive"] == s["nodes"] == (2 if site == "onprem" else 1)
    assert report["price_per_hour"] == pytest.approx(0.85)
    # every node up started is a recorded member, mirrored into the cluster's KV; no drift
    assert report["drift"] == [] and report["unrecorded_nodes"] == 0
    state = load_state(module_cluster.name, home=home)
    assert state.member_ids() == {n["node_id"] for n in report["nodes"]}
    with GcsView(state.address, state.token_path, state.tls) as view:
        mirrored = json.loads(view.kv_get(f"cluster/{state.name}"))
    assert set(mirrored["members"]) == state.member_ids() and mirrored["origin"] == "up"
    text = json.dumps(mirrored)                           # nothing secret in the KV
    assert state.token_path not in text and open(state.token_path).read() not in text

    monkeypatch.setenv("HYBRIDRAY_HOME", str(home))
    assert main(["status", module_cluster.name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["price_per_hour"] == pytest.approx(0.85)
    assert main(["status", "--json"]) == 0
    listed = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert listed[module_cluster.name]["state"] == "up"
    assert listed[module_cluster.name]["nodes_alive"] == 4
    assert main(["status", module_cluster.name]) == 0
    table = capsys.readouterr().out
    assert "cloud-b" in table and "0.85" in table


@pytest.mark.slow
def test_env_prints_the_exports_a_driver_needs(module_cluster, home, monkeypatch, capsys):
    monkeypatch.setenv("HYBRIDRAY_HOME", str(home))
    assert main(["env", module_cluster.name]) == 0
    out = capsys.readouterr().out
    assert f"export RAY_ADDRESS={module_cluster.address}" in out
    assert "export RAY_AUTH_MODE=token" in out
    assert f"export RAY_AUTH_TOKEN_PATH={module_cluster.token_path}" in out
    assert "RAY_API_SERVER_ADDRESS" not in out  # this cluster runs without a dashboard
    assert ray_env(module_cluster)["HYBRIDRAY_CLUSTER"] == module_cluster.name


@pytest.mark.slow
def test_up_of_a_running_name_refuses_and_changes_nothing(module_cluster, home):
    with pytest.raises(ClusterError, match="already up.*hybridray down local first"):
        start(home)
    assert load_state(module_cluster.name, home=home) == module_cluster
    assert all(rec.leader_alive() for rec in module_cluster.nodes)


@pytest.mark.slow
def test_a_pinned_port_in_use_is_refused_before_anything_starts(module_cluster, home):
    taken = module_cluster.ports["gcs"]  # the running cluster's GCS holds it
    with pytest.raises(ClusterError, match=f"--port {taken}: port {taken} is already in use"):
        up(load_topology(LOCAL_YAML, ["name=local3"]), home=home, port=taken)
    assert "local3" not in list_clusters(home)
    assert processes_mentioning(temp_prefix("local3")) == []


@pytest.mark.slow
def test_a_node_that_fails_to_start_takes_nothing_half_started_with_it(module_cluster, home):
    overrides = ["name=local4", "sites.onprem.pools.0.object_store_mb=1000000"]  # 1 TB
    with pytest.raises(ClusterError) as e:
        start(home, *overrides)
    message = str(e.value)
    assert "node onprem/cpu#0 exited" in message and "object store" in message
    assert "nothing is left running" in message
    assert "local4" not in list_clusters(home)
    assert processes_mentioning(temp_prefix("local4")) == []
    assert all(rec.leader_alive() for rec in module_cluster.nodes)  # the neighbour is untouched


@pytest.mark.slow
def test_a_second_cluster_runs_beside_the_first(module_cluster, second_cluster):
    a, b = module_cluster, second_cluster
    assert a.address != b.address and a.temp_dir != b.temp_dir
    assert not set(a.ports.values()) & set(b.ports.values())
    assert open(a.token_path).read() != open(b.token_path).read()
    for state in (a, b):
        nodes = [n for n in driver_json(run_driver(state, NODES_CODE)) if n["alive"]]
        assert {n["labels"]["hybridray.io/cluster"] for n in nodes} == {state.name}
        assert len(nodes) == 4
    # one cluster's token does not open the other
    crossed = ClusterState(**{**b.__dict__, "address": a.address})
    proc = run_driver(crossed, NODES_CODE, expect_refusal=True, timeout=90)
    assert proc.returncode != 0 and "InvalidAuthToken" in proc.stderr, proc.stderr[-3000:]

    # one driver process switching between the two clusters (in its own process: this pytest
    # process may be the driver of the session-wide cluster of tests/conftest.py)
    switching = run_driver(a, SWITCH_CODE.format(home=a.home, names=[a.name, b.name, a.name]))
    assert driver_json(switching) == [[a.name, "cloud-a"], [b.name, "cloud-a"],
                                      [a.name, "cloud-a"]]


@pytest.mark.slow
def test_ray_job_submit_works_with_the_printed_env(second_cluster, tmp_path):
    (tmp_path / "where.py").write_text(textwrap.dedent("""
        import ray
        ray.init()
        @ray.remote(num_cpus=1, label_selector={"hybridray.io/site": "cloud-b"})
        def where():
            return ray.get_runtime_context().get_node_labels()["hybridray.io/site"]
        print("ran at site", ray.get(where.remote()))
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(ray_env(second_cluster))
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    proc = subprocess.run([ray_cli, "job", "submit", "--working-dir", str(tmp_path), "--",
                           "python", "where.py"], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ran at site cloud-b" in proc.stdout


@pytest.mark.slow
@pytest.mark.chaos
def test_down_copes_with_a_node_killed_first(second_cluster, home):
    victim = next(n for n in second_cluster.nodes if n.site == "cloud-a")
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim.leader_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not victim.leader_alive()
    assert victim.group(), "the killed node's raylet should outlive its ray start process"
    report = status(second_cluster.name, home=home)
    assert report["state"] == "degraded"
    dead = next(n for n in report["nodes"] if n["key"] == victim.key)
    assert not dead["process_alive"] and not dead["running"] and dead["price_per_hour"] == 0
    assert report["price_per_hour"] == pytest.approx(0.85 - 0.34)

    stopped = down(second_cluster.name, home=home)
    assert sorted(stopped) == sorted(n.pid for n in second_cluster.nodes)  # orphans included
    assert all(_pid_gone(n.pid) and n.group() == [] for n in second_cluster.nodes)
    assert processes_mentioning(second_cluster.temp_dir + "/") == []
    assert down(second_cluster.name, home=home) == []


@pytest.mark.slow
def test_down_stops_every_process_and_is_idempotent(module_cluster, home, monkeypatch, capsys):
    monkeypatch.setenv("HYBRIDRAY_HOME", str(home))
    with pytest.raises(ClusterNotFound, match="recorded clusters: local"):
        down("no-such-cluster", home=home)
    assert main(["down", "no-such-cluster"]) == 2
    assert "no cluster named 'no-such-cluster'" in capsys.readouterr().err

    assert main(["down", str(LOCAL_YAML)]) == 0  # by file: the name comes from the topology
    assert "stopped cluster 'local': 4 node process(es)" in capsys.readouterr().out
    for rec in module_cluster.nodes:
        assert not os.path.exists(f"/proc/{rec.pid}"), f"{rec.key} pid {rec.pid} still exists"
        assert rec.group() == []
    assert not os.path.exists(module_cluster.token_path)
    assert not os.path.exists(module_cluster.temp_dir)
    assert (module_cluster.state_dir / "logs" / "head.log").exists()  # kept for a post-mortem
    assert "local" not in list_clusters(home)

    assert main(["down", "local"]) == 0
    assert "already down" in capsys.readouterr().out
    assert main(["status", "local", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "down"
