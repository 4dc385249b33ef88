"""Trust per site, proved with TLS handshakes built the way Ray builds its gRPC channels and
servers (``ray._private.grpc_utils.init_grpc_channel``, ``ray._common.tls_utils.
add_port_to_grpc_server``: mutual TLS from the three RAY_TLS_* files):

* every certificate ``hybridray certs`` issues, and every one the rendered init container /
  ``node-cert.sh`` mints (run as a non-root uid against read-only inputs), is accepted, dialled
  by IP and by name;
* after ``hybridray certs --revoke-site`` and a restart with the new ``trust.pem``, a node
  holding the revoked site's certificate is refused while other sites' nodes are accepted
  (gRPC checks no CRLs: what nodes trust is what revokes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from hybridray.cli import main
from hybridray.deploy.certs import NodeCert, cert_hosts
from hybridray.deploy.mint import NODE_CERT_SH
from tests.deploy.test_certs import HOST_IP_FLAGS
from tests.paths import CLUSTERS

TLS_VARS = ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


@pytest.fixture
def tls_env(monkeypatch):
    def use(node: NodeCert) -> None:
        for k, v in node.env().items():
            monkeypatch.setenv(k, v)
    yield use


def handshake(server: NodeCert, client: NodeCert, use, name: str | None = None) -> bool:
    """Does ``client`` complete mutual TLS with ``server``? Server and channel are made by
    Ray's own helpers from the RAY_TLS_* variables, exactly as a node makes them."""
    from ray._common.tls_utils import add_port_to_grpc_server
    from ray._private.grpc_utils import init_grpc_channel

    use(server)
    srv = grpc.server(futures.ThreadPoolExecutor(1))
    port = add_port_to_grpc_server(srv, "127.0.0.1:0")
    srv.start()
    try:
        use(client)
        # by IP: the target's host is what gRPC checks against the server's SANs. By a name
        # this machine cannot resolve (gpu-01.dc.internal): connect to 127.0.0.1 and have
        # gRPC check that name instead, which is what dialling the name does.
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = init_grpc_channel(f"127.0.0.1:{port}", options=options)
        try:
            grpc.channel_ready_future(channel).result(timeout=3)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            channel.close()
    finally:
        srv.stop(0)


def _secrets(tmp_path: Path) -> Path:
    out = tmp_path / "secrets"
    assert main(["certs", str(CLUSTERS / "onprem-aws.yaml"), "--out", str(out),
                 "--head-address", "127.0.0.1", "--host", "aws=127.0.0.1",
                 *HOST_IP_FLAGS]) == 0
    return out


def _node(d: Path, name: str) -> NodeCert:
    return NodeCert(cert=d / "nodes" / f"{name}.crt", key=d / "nodes" / f"{name}.key",
                    ca=d / "trust.pem")


def _keep(node: NodeCert, where: Path) -> NodeCert:
    """Copy a node's files away, as the node itself holds them."""
    where.mkdir(parents=True, exist_ok=True)
    for f in (node.cert, node.key, node.ca):
        shutil.copy(f, where / f.name)
    return NodeCert(cert=where / node.cert.name, key=where / node.key.name,
                    ca=where / node.ca.name)


def test_every_issued_certificate_is_accepted_by_ip_and_by_name(tmp_path, tls_env):
    d = _secrets(tmp_path)
    head = _node(d, "head")                       # site onprem, 127.0.0.1
    cloud = _node(d, "127.0.0.1")                 # --host aws=127.0.0.1: site aws
    for crt in sorted((d / "nodes").glob("*.crt")):
        node = _node(d, crt.stem)
        assert handshake(head, node, tls_env), crt.name          # as a client
        names = [h for h in cert_hosts(crt) if not h[0].isdigit() and h != "localhost"]
        for name in names or ["localhost"]:                     # as a server, by its name
            assert handshake(node, cloud, tls_env, name=name), (crt.name, name)
        if "127.0.0.1" in cert_hosts(crt):
            assert handshake(node, head, tls_env), crt.name       # by IP
    gpu = _node(d, "gpu-a100-01.dc2.example.internal")
    assert not handshake(gpu, cloud, tls_env, name="gpu-a100-02.dc2.example.internal")


def _mint_as_non_root(d: Path, site: str, work: Path, *sans: str) -> NodeCert:
    """Run the rendered init-container script as uid 1000 (the Ray image's user) with the
    Secret's files read-only, as KubeRay mounts them (defaultMode 0444, directory read-only)."""
    ca = work / "site-ca"
    out = work / "tls"
    ca.mkdir(parents=True)
    out.mkdir()
    shutil.copy(d / "sites" / site / "ca.crt", ca / "site-ca.crt")
    shutil.copy(d / "sites" / site / "ca.key", ca / "site-ca.key")
    shutil.copy(d / "trust.pem", ca / "ca.crt")
    for f in ca.iterdir():
        f.chmod(0o444)
    ca.chmod(0o555)
    out.chmod(0o777)  # an emptyDir
    work.chmod(0o755)
    script = work / "cmd.sh"
    script.write_text(NODE_CERT_SH)
    script.chmod(0o755)
    # exactly the init container's command: /bin/sh -c SCRIPT node-cert.sh CA OUT SANS...
    proc = subprocess.run(["/bin/sh", "-c", NODE_CERT_SH, "node-cert.sh", str(ca), str(out),
                           *sans], env={"PATH": os.environ["PATH"], "NODE_IP": "127.0.0.1"},
                          user=1000, group=1000, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "node.crt", "node.key"]
    assert sorted(p.name for p in ca.iterdir()) == ["ca.crt", "site-ca.crt", "site-ca.key"]
    assert os.stat(out / "node.key").st_uid == 1000
    return NodeCert(cert=out / "node.crt", key=out / "node.key", ca=out / "ca.crt")


@pytest.mark.skipif(os.geteuid() != 0, reason="running the script as uid 1000 needs root")
def test_the_init_container_script_mints_as_non_root_from_read_only_mounts(tmp_path, tls_env):
    import tempfile

    d = _secrets(tmp_path)
    svc = "onprem-gke-gke-head-svc.ml-burst.svc.cluster.local"
    work = Path(tempfile.mkdtemp(prefix="hr-pod-"))  # pytest's tmp dirs are 0700 (root's)
    work.chmod(0o755)
    try:
        pod = _keep(_mint_as_non_root(d, "aws", work / "pod", svc, "10.9.8.7"),
                    tmp_path / "pod")
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    assert {"127.0.0.1", svc, "10.9.8.7", "localhost"} <= set(cert_hosts(pod.cert))
    proc = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(d / "ca.crt"),
                           "-untrusted", str(pod.cert), str(pod.cert)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head = _node(d, "head")
    assert handshake(head, pod, tls_env) and handshake(pod, head, tls_env)
    assert handshake(pod, head, tls_env, name=svc)  # the head Service name remote pods dial


def test_a_revoked_site_cannot_join_after_the_restart_while_other_sites_can(tmp_path,
                                                                            tls_env):
    d = _secrets(tmp_path)
    head = _keep(_node(d, "head"), tmp_path / "head")                    # site onprem
    onprem = _keep(_node(d, "cpu-01.dc2.example.internal"), tmp_path / "onprem")
    aws = _keep(_node(d, "127.0.0.1"), tmp_path / "aws")                # site aws
    assert handshake(head, aws, tls_env) and handshake(head, onprem, tls_env)
    old_token = (d / "token").read_text()

    assert main(["certs", str(CLUSTERS / "onprem-aws.yaml"), "--out", str(d),
                 "--revoke-site", "aws"]) == 0
    assert (d / "token").read_text() != old_token           # the aws nodes held the token
    assert not (d / "sites" / "aws").exists() and not (d / "nodes" / "127.0.0.1.crt").exists()
    # before the restart the head still trusts what it loaded
    assert handshake(head, aws, tls_env)
    # the documented restart: every other node gets the new trust.pem, then restarts
    restarted = replace(head, ca=Path(shutil.copy(d / "trust.pem", tmp_path / "head" /
                                                  "new-trust.pem")))
    onprem2 = replace(onprem, ca=restarted.ca)
    assert not handshake(restarted, aws, tls_env)      # the revoked site's node: refused
    assert not handshake(aws, restarted, tls_env)      # and it cannot serve the others either
    assert handshake(restarted, onprem2, tls_env)      # the other site's node: accepted
    # certs again re-admits the site with a new CA; the old certificates stay refused
    assert main(["certs", str(CLUSTERS / "onprem-aws.yaml"), "--out", str(d),
                 "--host", "aws=127.0.0.1", *HOST_IP_FLAGS]) == 0
    new_aws = _node(d, "127.0.0.1")
    fresh = replace(restarted, ca=d / "trust.pem")
    assert handshake(fresh, new_aws, tls_env) and not handshake(fresh, aws, tls_env)
