"""hybridray certs: a cluster CA, host certificates Ray's TLS accepts, the token; and
certificates that do not match are refused before anything starts."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography import x509

from hybridray.cli import main
from hybridray.cluster import list_clusters, up
from hybridray.deploy.certs import (
    NodeCert,
    cert_hosts,
    check_node_cert,
    create_ca,
    issue_node_cert,
)
from hybridray.deploy.secrets import make_secrets
from hybridray.exceptions import CertificateError
from hybridray.topology import load_topology
from tests.paths import CLUSTERS


def test_a_node_certificate_chains_to_its_ca_and_names_its_hosts(tmp_path):
    create_ca(tmp_path, "c1")
    node = issue_node_cert(tmp_path, "gpu-01", ["gpu-01.dc.internal", "10.0.0.7"])
    check_node_cert(node, "10.0.0.7")
    assert set(cert_hosts(node.cert)) == {"gpu-01.dc.internal", "10.0.0.7", "localhost",
                                          "127.0.0.1"}
    cert = x509.load_pem_x509_certificate(node.cert.read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (tmp_path / "ca.key", node.key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert node.env() == {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(node.cert),
                          "RAY_TLS_SERVER_KEY": str(node.key), "RAY_TLS_CA_CERT": str(node.ca)}


def test_mismatched_certificates_are_refused_with_the_file_and_fix(tmp_path):
    create_ca(tmp_path / "a", "a")
    create_ca(tmp_path / "b", "b")
    mine = issue_node_cert(tmp_path / "a", "n1", ["10.0.0.1"])
    other = issue_node_cert(tmp_path / "b", "n2", ["10.0.0.2"])
    with pytest.raises(CertificateError, match="not signed by the cluster CA"):
        check_node_cert(NodeCert(cert=other.cert, key=other.key, ca=mine.ca))
    with pytest.raises(CertificateError, match="does not belong to certificate"):
        check_node_cert(NodeCert(cert=mine.cert, key=other.key, ca=mine.ca))
    with pytest.raises(CertificateError, match="does not name 10.9.9.9"):
        check_node_cert(mine, "10.9.9.9")
    with pytest.raises(CertificateError, match="does not exist; create it with hybridray certs"):
        check_node_cert(NodeCert(cert=tmp_path / "nope.crt", key=mine.key, ca=mine.ca))
    with pytest.raises(CertificateError, match="already holds a cluster CA"):
        create_ca(tmp_path / "a", "a")
    with pytest.raises(CertificateError, match="holds no cluster CA"):
        issue_node_cert(tmp_path / "empty", "x", ["h"])


def test_up_refuses_a_certificate_from_another_ca_before_starting_anything(tmp_path):
    create_ca(tmp_path / "a", "a")
    create_ca(tmp_path / "b", "b")
    from hybridray.cluster.local import _node_ip

    theirs = issue_node_cert(tmp_path / "b", "local", [_node_ip()])
    tls = NodeCert(cert=theirs.cert, key=theirs.key, ca=tmp_path / "a" / "ca.crt").env()
    home = tmp_path / "home"
    with pytest.raises(CertificateError, match="not signed by the cluster CA"):
        up(load_topology(CLUSTERS / "local.yaml", ["name=tls-bad"]), home=home, tls=tls)
    assert list_clusters(home) == [] and not (home / "clusters" / "tls-bad").exists()


def test_up_cli_wants_all_three_tls_files(capsys):
    assert main(["up", str(CLUSTERS / "local.yaml"), "--tls", "--tls-cert", "x.crt"]) == 2
    assert "all three of --tls-cert, --tls-key and --tls-ca" in capsys.readouterr().err


def test_certs_makes_the_token_ca_and_one_certificate_per_host(tmp_path, capsys):
    out = tmp_path / "secrets"
    assert main(["certs", str(CLUSTERS / "onprem-aws.yaml"), "--out", str(out),
                 "--head-address", "10.0.0.5", "--host", "admin.example.internal"]) == 0
    topology = load_topology(CLUSTERS / "onprem-aws.yaml")
    hosts = {h for p in topology.sites["onprem"].pools for h in p.hosts}
    names = {p.stem for p in (out / "nodes").glob("*.crt")}
    assert names == hosts | {"head", "admin.example.internal"}
    assert "10.0.0.5" in cert_hosts(out / "nodes" / "head.crt")
    token = (out / "token").read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(os.stat(out / "token").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert token not in capsys.readouterr().out  # never printed

    lines = make_secrets(topology, out)  # again: everything kept
    assert (out / "token").read_text() == token and any("kept" in li for li in lines)
    make_secrets(topology, out, rotate_token=True)
    assert (out / "token").read_text() != token
    check_node_cert(NodeCert(cert=out / "nodes" / "head.crt", key=out / "nodes" / "head.key",
                             ca=out / "ca.crt"), "10.0.0.5")  # the CA survived the rotation
