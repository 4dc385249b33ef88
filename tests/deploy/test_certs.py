"""hybridray certs: a root CA, one intermediate per site, host certificates with IP SANs that
``openssl verify -x509_strict`` and Ray's TLS accept, the token; and certificates that do not
match are refused before anything starts (issue 12 item 10, issue 11 item 6)."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from cryptography import x509

from hybridray.cli import main
from hybridray.cluster import list_clusters, up
from hybridray.deploy.certs import (
    NodeCert,
    cert_hosts,
    check_node_cert,
    create_ca,
    create_site_ca,
    issue_node_cert,
)
from hybridray.deploy.secrets import make_secrets
from hybridray.exceptions import CertificateError
from hybridray.topology import load_topology
from tests.paths import CLUSTERS

HOSTS = {"gpu-a100-01.dc2.example.internal": "10.20.0.11",
         "gpu-a100-02.dc2.example.internal": "10.20.0.12",
         "cpu-01.dc2.example.internal": "10.20.0.21", "cpu-02.dc2.example.internal": "10.20.0.22",
         "cpu-03.dc2.example.internal": "10.20.0.23", "cpu-04.dc2.example.internal": "10.20.0.24"}
HOST_IP_FLAGS = [a for name, ip in HOSTS.items() for a in ("--host-ip", f"{name}={ip}")]


def _ca(path, site="s1"):
    create_ca(path, "c1")
    create_site_ca(path, "c1", site)


def test_a_node_certificate_chains_to_its_site_ca_and_names_its_hosts(tmp_path):
    _ca(tmp_path)
    node = issue_node_cert(tmp_path, "gpu-01", ["gpu-01.dc.internal", "10.0.0.7"], site="s1")
    check_node_cert(node, "10.0.0.7")
    assert set(cert_hosts(node.cert)) == {"gpu-01.dc.internal", "10.0.0.7", "localhost",
                                          "127.0.0.1"}
    leaf, mid = x509.load_pem_x509_certificates(node.cert.read_bytes())  # the chain it sends
    root = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    leaf.verify_directly_issued_by(mid)
    mid.verify_directly_issued_by(root)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "127.0.0.1"]
    # the root's path length lets it sign site CAs; a site CA signs only nodes
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    assert mid.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    for key in (tmp_path / "ca.key", tmp_path / "sites" / "s1" / "ca.key", node.key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert node.ca == tmp_path / "trust.pem"
    trusted = x509.load_pem_x509_certificates(node.ca.read_bytes())
    assert trusted == [mid]  # nodes trust the site CAs, never the root itself


def test_every_certificate_passes_openssl_x509_strict(tmp_path):
    """Item 10: key identifiers present, basic constraints and key usage as RFC 5280 wants."""
    topology = load_topology(CLUSTERS / "onprem-aws.yaml")
    make_secrets(topology, tmp_path, head="10.20.0.5", hosts=["aws=10.30.0.9"], host_ips=HOSTS)
    nodes = sorted((tmp_path / "nodes").glob("*.crt"))
    assert len(nodes) == 8
    for crt in nodes:
        proc = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile",
                               str(tmp_path / "ca.crt"), "-untrusted", str(crt), str(crt)],
                              capture_output=True, text=True)
        assert proc.returncode == 0 and ": OK" in proc.stdout, proc.stdout + proc.stderr
    for mid in (tmp_path / "sites").glob("*/ca.crt"):
        proc = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile",
                               str(tmp_path / "ca.crt"), str(mid)], capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mismatched_certificates_are_refused_with_the_file_and_fix(tmp_path):
    _ca(tmp_path / "a")
    _ca(tmp_path / "b")
    mine = issue_node_cert(tmp_path / "a", "n1", ["10.0.0.1"], site="s1")
    other = issue_node_cert(tmp_path / "b", "n2", ["10.0.0.2"], site="s1")
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
        create_site_ca(tmp_path / "empty", "c", "s1")
    with pytest.raises(CertificateError, match="site 's2' has no intermediate CA"):
        issue_node_cert(tmp_path / "a", "x", ["h"], site="s2")


def test_up_refuses_a_certificate_from_another_ca_before_starting_anything(tmp_path):
    _ca(tmp_path / "a")
    _ca(tmp_path / "b")
    from hybridray.cluster.local import _node_ip

    theirs = issue_node_cert(tmp_path / "b", "local", [_node_ip()], site="s1")
    tls = NodeCert(cert=theirs.cert, key=theirs.key, ca=tmp_path / "a" / "trust.pem").env()
    home = tmp_path / "home"
    with pytest.raises(CertificateError, match="not signed by the cluster CA"):
        up(load_topology(CLUSTERS / "local.yaml", ["name=tls-bad"]), home=home, tls=tls)
    assert list_clusters(home) == [] and not (home / "clusters" / "tls-bad").exists()


def test_up_cli_wants_all_three_tls_files(capsys):
    assert main(["up", str(CLUSTERS / "local.yaml"), "--tls", "--tls-cert", "x.crt"]) == 2
    assert "all three of --tls-cert, --tls-key and --tls-ca" in capsys.readouterr().err


def test_certs_makes_the_token_cas_and_one_certificate_per_host(tmp_path, capsys):
    out = tmp_path / "secrets"
    assert main(["certs", str(CLUSTERS / "onprem-aws.yaml"), "--out", str(out),
                 "--head-address", "10.0.0.5", "--host", "admin.example.internal",
                 "--host-ip", "admin.example.internal=10.0.0.99", *HOST_IP_FLAGS]) == 0
    printed = capsys.readouterr().out
    topology = load_topology(CLUSTERS / "onprem-aws.yaml")
    hosts = {h for p in topology.sites["onprem"].pools for h in p.hosts}
    names = {p.stem for p in (out / "nodes").glob("*.crt")}
    assert names == hosts | {"head", "admin.example.internal"}
    assert {"10.0.0.5"} <= set(cert_hosts(out / "nodes" / "head.crt"))
    for host in hosts:  # item 10: static hosts listed by name carry their IP too
        assert {host, HOSTS[host]} <= set(cert_hosts(out / "nodes" / f"{host}.crt"))
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["aws", "onprem"]
    token = (out / "token").read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(os.stat(out / "token").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert token not in printed  # never printed
    assert "hybridray[deploy]" not in printed

    lines = make_secrets(topology, out, host_ips=HOSTS)  # again: everything kept
    assert (out / "token").read_text() == token and any("kept" in li for li in lines)
    make_secrets(topology, out, rotate_token=True, host_ips=HOSTS)
    assert (out / "token").read_text() != token
    check_node_cert(NodeCert(cert=out / "nodes" / "head.crt", key=out / "nodes" / "head.key",
                             ca=out / "trust.pem"), "10.0.0.5")  # the CAs survived rotation


def test_certs_refuses_hosts_it_cannot_give_an_ip(tmp_path, capsys):
    assert main(["certs", str(CLUSTERS / "onprem-aws.yaml"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "does not resolve on this machine" in err and "--host-ip" in err
    assert not (tmp_path / "s").exists()  # refused before anything was written
    assert main(["certs", str(CLUSTERS / "onprem-aws.yaml"), "--out", str(tmp_path / "s"),
                 "--head-address", "10.0.0.5;reboot", *HOST_IP_FLAGS]) == 2
    assert "--head-address" in capsys.readouterr().err


def test_no_certs_message_points_at_a_missing_extra():
    from pathlib import Path

    import tomllib

    from hybridray.deploy import certs

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    source = Path(certs.__file__).read_text()
    for extra in ("deploy",):
        assert f"hybridray[{extra}]" not in source and extra not in extras
    assert "hybridray[aws]" in source and "cryptography" in " ".join(extras["aws"])
