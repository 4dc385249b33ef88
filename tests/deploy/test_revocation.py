"""Issue 11 item 6 on a real Ray cluster with gRPC TLS: after ``hybridray certs --revoke-site``
and the documented restart (the head restarted with the new ``trust.pem``), a node holding the
revoked site's certificate can no longer join, while another site's node still can. The
joins run the rendered join script (once mode), as a host would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybridray.cluster import down, load_state, ray_env
from hybridray.cluster.local import _node_ip
from hybridray.cluster.plan import NODE
from hybridray.cluster.ports import free_ports
from hybridray.deploy.certs import NodeCert, create_ca, create_site_ca, issue_node_cert
from hybridray.deploy.common import RenderOptions
from hybridray.deploy.render import render
from hybridray.topology import load_topology
from tests.deploy.test_on_cluster import RAY, WAIT_FOR, _clean_env, _driver, _last_json, _stop
from tests.paths import CLUSTERS

pytestmark = pytest.mark.slow
NAME = "revoke"
SMALL = [f"name={NAME}", "sites.cloud-a.pools.0.count=0", "sites.cloud-b.pools.0.count=0"]


def _up(home: Path, head: NodeCert) -> None:
    proc = subprocess.run([sys.executable, "-m", "hybridray", "up", str(CLUSTERS / "local.yaml"),
                           *SMALL, "--tls", "--tls-cert", str(head.cert), "--tls-key",
                           str(head.key), "--tls-ca", str(head.ca), "--no-dashboard",
                           "--timeout", "240"],
                          env=_clean_env(HYBRIDRAY_HOME=str(home)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _join_once(state, tmp_path: Path, site: str, pool: str, node: NodeCert,
               wait: float) -> tuple[int | None, list]:
    """Run SITE's rendered join script (HYBRIDRAY_ONCE) with ``node``'s files; return its
    exit code (None: still running, i.e. joined and blocking) and the nodes the GCS saw."""
    topology = load_topology(CLUSTERS / "local.yaml", [f"name={NAME}",
                                                       f"sites.{site}.pools.0.count=1"])
    out = tmp_path / f"deploy-{site}"
    render(topology, out, RenderOptions(head_address=state.address))
    ports = free_ports(6, exclude=set(state.ports.values()))
    temp = f"/tmp/hrr-{os.getpid()}-{site}"
    extra = (f"--node-manager-port {ports[0]} --object-manager-port {ports[1]} "
             f"--runtime-env-agent-port {ports[2]} --dashboard-agent-grpc-port {ports[3]} "
             f"--dashboard-agent-listen-port {ports[4]} --metrics-export-port {ports[5]}")
    env = _clean_env(HYBRIDRAY_CONF=str(tmp_path / "none.env"), HYBRIDRAY_RAY=RAY,
                     HYBRIDRAY_TOKEN_FILE=state.token_path, HYBRIDRAY_TLS_CERT=str(node.cert),
                     HYBRIDRAY_TLS_KEY=str(node.key), HYBRIDRAY_TLS_CA=str(node.ca),
                     HYBRIDRAY_RAY_START_EXTRA=extra, HYBRIDRAY_TEMP_DIR=temp,
                     HYBRIDRAY_NODE_IP=state.address.rsplit(":", 1)[0], HYBRIDRAY_ONCE="1",
                     RAY_gcs_rpc_server_reconnect_timeout_s="15")
    log = open(tmp_path / f"join-{site}.log", "wb")
    proc = subprocess.Popen(["bash", str(out / site / f"join-{pool}-0.sh")], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.temp_dir = temp  # type: ignore[attr-defined]
    try:
        seen = _last_json(_driver(_clean_env(**ray_env(state)),
                                  WAIT_FOR.format(wait=wait, node=NODE, key=f"{site}.{pool}.0"),
                                  timeout=wait + 120))
        return proc.poll(), seen
    finally:
        _stop(proc)


def test_a_revoked_sites_node_cannot_join_after_the_restart_but_others_can(tmp_path):
    ip = _node_ip()
    d = tmp_path / "secrets"
    create_ca(d, NAME)
    for site in ("onprem", "cloud-a", "cloud-b"):
        create_site_ca(d, NAME, site)
    head = issue_node_cert(d, "head", [ip], site="onprem")
    a = issue_node_cert(d, "a", [ip], site="cloud-a")
    b = issue_node_cert(d, "b", [ip], site="cloud-b")
    held = tmp_path / "b-holds"  # what the cloud-b host keeps, whatever the operator does
    held.mkdir()
    b = NodeCert(cert=Path(shutil.copy(b.cert, held)), key=Path(shutil.copy(b.key, held)),
                 ca=Path(shutil.copy(b.ca, held)))
    home = tmp_path / "home"
    try:
        _up(home, head)
        state = load_state(NAME, home=home)
        code, seen = _join_once(state, tmp_path / "1", "cloud-b", "spot", b, wait=120)
        assert len(seen) == 1, (tmp_path / "1" / "join-cloud-b.log").read_text()[-3000:]
        down(NAME, home=home)

        from hybridray.deploy.certs import revoke_site

        revoke_site(d, "cloud-b")          # hybridray certs --revoke-site cloud-b
        _up(home, head)                    # the restart: the head loads the new trust.pem
        state = load_state(NAME, home=home)
        code, seen = _join_once(state, tmp_path / "2", "cloud-b", "spot", b, wait=30)
        assert seen == [], "a node of the revoked site joined"
        log = (tmp_path / "2" / "join-cloud-b.log").read_text()
        assert code is None or code != 0, log[-3000:]
        code, seen = _join_once(state, tmp_path / "3", "cloud-a", "cpu", a, wait=120)
        assert len(seen) == 1, (tmp_path / "3" / "join-cloud-a.log").read_text()[-3000:]
        assert seen[0]["labels"]["hybridray.io/site"] == "cloud-a"
    finally:
        down(NAME, home=home)
