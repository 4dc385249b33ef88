"""Rendered files and security settings against real clusters on this machine.

A TLS cluster of its own (head + one node, no dashboard), brought up by the ``hybridray up``
command in a subprocess so this pytest process never loads TLS settings into its own Ray
config; the session-wide ``local_cluster`` for the token and job tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridray import labels as L
from hybridray.cluster import down, load_state, ray_env
from hybridray.cluster.plan import NODE
from hybridray.cluster.ports import free_ports
from hybridray.deploy.certs import create_ca, create_site_ca, issue_node_cert
from hybridray.deploy.common import RenderOptions
from hybridray.deploy.render import render
from hybridray.topology import load_topology
from tests.paths import CLUSTERS

pytestmark = pytest.mark.slow
TLS_NAME = "tlsnet"
SMALL = [f"name={TLS_NAME}", "sites.cloud-a.pools.0.count=0", "sites.cloud-b.pools.0.count=0"]
RAY = str(Path(sys.executable).parent / "ray")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HYBRIDRAY_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tls_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tls-home")


@pytest.fixture(scope="module")
def tls_cluster(tls_home):
    """clusters/local.yaml cut to head + one onprem node, with Ray's gRPC TLS on."""
    env = _clean_env(HYBRIDRAY_HOME=str(tls_home))
    proc = subprocess.run([sys.executable, "-m", "hybridray", "up", str(CLUSTERS / "local.yaml"),
                           *SMALL, "--tls", "--no-dashboard", "--timeout", "240"],
                          env=env, capture_output=True, text=True, timeout=600)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield load_state(TLS_NAME, home=tls_home)
    finally:
        down(TLS_NAME, home=tls_home)


def _driver(env: dict[str, str], code: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import json, ray\n" + code], env=env,
                          capture_output=True, text=True, timeout=timeout)


NODES = """
ray.init(log_to_driver=False)
print(json.dumps([{"alive": n["Alive"], "labels": n["Labels"], "resources": n["Resources"]}
                  for n in ray.nodes()]))
"""

WAIT_FOR = """
import time
ray.init(log_to_driver=False)
deadline = time.monotonic() + {wait}
seen = []
while time.monotonic() < deadline:
    seen = [n for n in ray.nodes() if n["Alive"] and n["Labels"].get({node!r}) == {key!r}]
    if seen:
        break
    time.sleep(1)
print(json.dumps([{{"labels": n["Labels"], "resources": n["Resources"]}} for n in seen]))
"""

WORK = """
ray.init(log_to_driver=False)
@ray.remote(num_cpus=1, label_selector={"hybridray.io/site": "onprem"})
def where():
    return ray.get_runtime_context().get_node_labels()["hybridray.io/site"]
print(json.dumps(ray.get(where.remote(), timeout=120)))
"""


def _last_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_with_tls_the_local_cluster_runs_work_and_drivers_get_the_tls_env(tls_cluster):
    env = ray_env(tls_cluster)
    assert env["RAY_USE_TLS"] == "1"
    for var in ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT"):
        assert Path(env[var]).is_file(), var
    assert _last_json(_driver(_clean_env(**env), WORK)) == "onprem"
    out = subprocess.run([sys.executable, "-m", "hybridray", "env", TLS_NAME],
                         env=_clean_env(HYBRIDRAY_HOME=tls_cluster.home), capture_output=True,
                         text=True, timeout=60).stdout
    assert "export RAY_USE_TLS=1" in out and "export RAY_TLS_CA_CERT=" in out
    status = subprocess.run([sys.executable, "-m", "hybridray", "status", TLS_NAME, "--json"],
                            env=_clean_env(HYBRIDRAY_HOME=tls_cluster.home),
                            capture_output=True, text=True, timeout=120)
    report = json.loads(status.stdout)
    assert report["gcs"]["reachable"] and report["state"] == "up", status.stderr[-2000:]


def _join(tls_cluster, tmp_path: Path, cert: dict[str, str], once: bool = False
          ) -> subprocess.Popen:
    """Run the rendered join script of cloud-b's node against the TLS cluster's head."""
    topology = load_topology(CLUSTERS / "local.yaml",
                             [f"name={TLS_NAME}", "sites.cloud-b.pools.0.count=1"])
    render(topology, tmp_path / "deploy", RenderOptions(head_address=tls_cluster.address))
    script = tmp_path / "deploy" / "cloud-b" / "join-spot-0.sh"
    ports = free_ports(6, exclude=set(tls_cluster.ports.values()))
    temp = f"/tmp/hrj-{os.getpid()}-{tmp_path.name[-6:]}"
    extra = (f"--temp-dir {temp} --node-manager-port {ports[0]} --object-manager-port "
             f"{ports[1]} --runtime-env-agent-port {ports[2]} --dashboard-agent-grpc-port "
             f"{ports[3]} --dashboard-agent-listen-port {ports[4]} --metrics-export-port "
             f"{ports[5]}")  # several nodes share this machine: no fixed ports
    env = _clean_env(HYBRIDRAY_CONF=str(tmp_path / "no-cluster.env"), HYBRIDRAY_RAY=RAY,
                     HYBRIDRAY_TOKEN_FILE=tls_cluster.token_path,
                     HYBRIDRAY_TLS_CERT=cert["RAY_TLS_SERVER_CERT"],
                     HYBRIDRAY_TLS_KEY=cert["RAY_TLS_SERVER_KEY"],
                     HYBRIDRAY_TLS_CA=cert["RAY_TLS_CA_CERT"], HYBRIDRAY_RAY_START_EXTRA=extra,
                     HYBRIDRAY_NODE_IP=tls_cluster.address.rsplit(":", 1)[0],
                     HYBRIDRAY_ONCE="1" if once else "0",
                     RAY_gcs_rpc_server_reconnect_timeout_s="20")
    log = open(tmp_path / "join.log", "wb")
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.temp_dir = temp  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the join script's own session: ray start and its raylet
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            time.sleep(1)
        except subprocess.TimeoutExpired:
            continue
    shutil.rmtree(proc.temp_dir, ignore_errors=True)  # type: ignore[attr-defined]


def test_a_rendered_join_script_joins_with_its_sites_labels_and_resources(tls_cluster,
                                                                          tmp_path):
    proc = _join(tls_cluster, tmp_path, tls_cluster.tls)
    try:
        seen = _last_json(_driver(_clean_env(**ray_env(tls_cluster)),
                                  WAIT_FOR.format(wait=180, node=NODE, key="cloud-b.spot.0"),
                                  timeout=300))
        assert len(seen) == 1, (tmp_path / "join.log").read_text()[-3000:]
        topology = load_topology(CLUSTERS / "local.yaml", [f"name={TLS_NAME}"])
        pool = topology.sites["cloud-b"].pools[0]
        labels = seen[0]["labels"]
        for key, value in L.node_labels(topology, "cloud-b", pool).items():
            assert labels[key] == value, key
        assert labels[L.MARKET_TYPE] == "spot" and labels[L.SITE] == "cloud-b"
        resources = seen[0]["resources"]
        assert resources["site:cloud-b"] == 1000
        assert resources["CPU"] == pool.cpus
        assert resources["memory"] == pool.memory_gb * 2**30
    finally:
        _stop(proc)


def test_a_node_with_a_certificate_from_another_ca_cannot_join(tls_cluster, tmp_path):
    create_ca(tmp_path / "rogue", "rogue")
    create_site_ca(tmp_path / "rogue", "rogue", "cloud-b")
    ip = tls_cluster.address.rsplit(":", 1)[0]
    rogue = issue_node_cert(tmp_path / "rogue", "local", [ip], site="cloud-b").env()
    proc = _join(tls_cluster, tmp_path, rogue, once=True)
    try:
        try:
            code = proc.wait(240)
        except subprocess.TimeoutExpired:
            code = None
        seen = _last_json(_driver(_clean_env(**ray_env(tls_cluster)),
                                  WAIT_FOR.format(wait=1, node=NODE, key="cloud-b.spot.0")))
        assert seen == []  # the GCS never took it in
        log = (tmp_path / "join.log").read_text()
        assert code is None or code != 0, log[-3000:]
    finally:
        _stop(proc)


# ---- token auth and jobs on the session-wide cluster ------------------------------------

def _ray_job(env: dict[str, str], address: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", "submit", "--address", address, "--", "python", "-c",
                           "print('job ran')"], env=env, capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)


def test_ray_job_submit_without_or_with_a_wrong_token_is_refused(local_cluster, tmp_path):
    url = local_cluster.dashboard_url
    bare = _clean_env(HOME=str(tmp_path))  # no ~/.ray/auth_token either
    proc = _ray_job(bare, url, tmp_path)
    assert proc.returncode != 0 and "job ran" not in proc.stdout
    text = (proc.stdout + proc.stderr).lower()
    assert "401" in text or "unauthorized" in text or "token" in text, text[-2000:]
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 64)
    proc = _ray_job(_clean_env(HOME=str(tmp_path), RAY_AUTH_MODE="token",
                               RAY_AUTH_TOKEN_PATH=str(wrong)), url, tmp_path)
    assert proc.returncode != 0 and "job ran" not in proc.stdout
    proc = _ray_job(_clean_env(**ray_env(local_cluster)), url, tmp_path)  # the right one
    assert proc.returncode == 0 and "job ran" in proc.stdout, proc.stderr[-2000:]


def test_submit_with_a_site_runs_the_entrypoint_at_that_site(local_cluster, hybridray_home,
                                                             tmp_path, capsys):
    from hybridray.audit import AuditLog
    from hybridray.cli import main

    (tmp_path / "hello.py").write_text("print('entrypoint ran')\n")
    assert main(["submit", "--cluster", local_cluster.name, "--site", "cloud-b", "--data-class",
                 "public", "--working-dir", str(tmp_path), "--", "python", "hello.py"]) == 0
    out = capsys.readouterr().out
    assert "entrypoint ran" in out and "its entrypoint ran at site cloud-b" in out, out
    records = AuditLog.for_cluster(local_cluster.name, hybridray_home).read("placement")
    assert records[-1]["source"] == "submit" and records[-1]["sites"][0] == "cloud-b"

    # restricted data may not go to cloud-b: refused before anything is submitted, and audited
    assert main(["submit", "--cluster", local_cluster.name, "--site", "cloud-b", "--data-class",
                 "restricted", "--", "python", "hello.py"]) == 2
    assert "residency" in capsys.readouterr().err
    refusal = AuditLog.for_cluster(local_cluster.name, hybridray_home).read("refusal")[-1]
    assert refusal["source"] == "submit"
