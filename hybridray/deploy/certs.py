"""A cluster's own certificate authority, and the node certificates Ray's gRPC TLS needs.

Ray's gRPC TLS (``RAY_USE_TLS=1``) is mutual: every node and every driver presents a
certificate, and each side accepts the other only when it chains to ``RAY_TLS_CA_CERT``. So a
hybrid cluster needs one CA of its own (never a public one: anything it signed could join)
and one certificate per machine, whose subject alternative names hold the addresses other
nodes dial. ``hybridray certs`` writes them; ``hybridray up --tls`` uses them locally.

Layout of a certificate directory::

    DIR/ca.crt            the cluster CA (distribute everywhere; public)
    DIR/ca.key            the CA's key (mode 0600; keep offline, or on the nodes that mint
                          their own certificate at boot: cloud and Kubernetes nodes)
    DIR/nodes/NAME.crt    one certificate per machine (SANs: its host names and IPs)
    DIR/nodes/NAME.key    its key (mode 0600)
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hybridray.exceptions import CertificateError

CA_DAYS = 3650
NODE_DAYS = 365
LOCAL_NAMES = ("localhost", "127.0.0.1")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class NodeCert:
    """Where one node's certificate, key and the CA that signed them lie."""

    cert: Path
    key: Path
    ca: Path

    def env(self) -> dict[str, str]:
        """The variables that turn Ray's gRPC TLS on for a node or driver using this cert."""
        return tls_env(self.cert, self.key, self.ca)


def tls_env(cert: str | os.PathLike, key: str | os.PathLike,
            ca: str | os.PathLike) -> dict[str, str]:
    """``RAY_USE_TLS=1`` plus Ray's three path variables."""
    return {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(cert),
            "RAY_TLS_SERVER_KEY": str(key), "RAY_TLS_CA_CERT": str(ca)}


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise CertificateError('certificates need the cryptography package; '
                               'pip install "hybridray[deploy]"') from None
    return x509, hashes, serialization, ec, NameOID, ExtendedKeyUsageOID


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    _, _, serialization, *_ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create_ca(directory: str | os.PathLike, cluster: str) -> Path:
    """Write ``ca.crt`` and ``ca.key`` (0600) for ``cluster`` into ``directory``.

    Raises:
        CertificateError: ``directory`` already holds a CA (rotating one is a deliberate
            act: move the old directory away first).
    """
    x509, hashes, serialization, ec, NameOID, _ = _crypto()
    directory = Path(directory)
    if (directory / "ca.crt").exists() or (directory / "ca.key").exists():
        raise CertificateError(f"{directory} already holds a cluster CA; issue node "
                               "certificates from it, or move it away to start a new CA")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hybridray"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"hybridray {cluster} CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(directory / "ca.key", _key_pem(key), 0o600)
    _write(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return directory / "ca.crt"


def issue_node_cert(directory: str | os.PathLike, name: str, hosts: list[str]) -> NodeCert:
    """A certificate for one machine, signed by the CA in ``directory``.

    Args:
        directory: a directory made by ``create_ca``.
        name: the file name stem (``nodes/NAME.crt``), usually the host name.
        hosts: host names and IP addresses other nodes use to reach it; ``localhost`` and
            ``127.0.0.1`` are always added (Ray dials some local services on loopback).
    """
    x509, hashes, serialization, ec, NameOID, EKU = _crypto()
    directory = Path(directory)
    ca_cert, ca_key = _load_ca(directory)
    sans: list = []
    for host in dict.fromkeys([*hosts, *LOCAL_NAMES]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]
                                                        if hosts else name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=NODE_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH, EKU.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    stem = _SAFE.sub("_", name)
    out = NodeCert(cert=directory / "nodes" / f"{stem}.crt",
                   key=directory / "nodes" / f"{stem}.key", ca=directory / "ca.crt")
    _write(out.key, _key_pem(key), 0o600)
    _write(out.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return out


def _load_ca(directory: Path):
    x509, _, serialization, *_ = _crypto()
    crt, key = directory / "ca.crt", directory / "ca.key"
    if not crt.is_file() or not key.is_file():
        raise CertificateError(f"{directory} holds no cluster CA (ca.crt and ca.key); "
                               f"create one with: hybridray certs CLUSTER.yaml --out {directory}")
    return (x509.load_pem_x509_certificate(crt.read_bytes()),
            serialization.load_pem_private_key(key.read_bytes(), None))


def check_node_cert(node: NodeCert, host: str | None = None) -> None:
    """Refuse a certificate Ray would reject only later, with a vaguer error.

    Checks that the three files exist and parse, that the key belongs to the certificate,
    that the certificate was signed by the CA and is valid now, and (with ``host``) that it
    names ``host`` among its SANs.

    Raises:
        CertificateError: naming the file and the fix.
    """
    x509, _, serialization, ec, *_ = _crypto()
    from cryptography.exceptions import InvalidSignature

    for what, path in (("certificate", node.cert), ("key", node.key), ("CA", node.ca)):
        if not Path(path).is_file():
            raise CertificateError(f"TLS {what} {path} does not exist; create it with "
                                   "hybridray certs CLUSTER.yaml --out DIR")
    try:
        cert = x509.load_pem_x509_certificate(Path(node.cert).read_bytes())
        ca = x509.load_pem_x509_certificate(Path(node.ca).read_bytes())
        key = serialization.load_pem_private_key(Path(node.key).read_bytes(), None)
    except ValueError as e:
        raise CertificateError(f"cannot read the TLS files {node.cert}, {node.key}, {node.ca} "
                               f"({e}); they must be PEM, the key unencrypted") from None
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise CertificateError(f"TLS key {node.key} does not belong to certificate "
                               f"{node.cert}; issue both again with hybridray certs")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(
            f"certificate {node.cert} was not signed by the cluster CA {node.ca} (issuer "
            f"{cert.issuer.rfc4514_string()!r}); every node needs a certificate from the same "
            "CA: issue it with hybridray certs using that CA's directory") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError(f"certificate {node.cert} is not valid now (valid "
                               f"{cert.not_valid_before_utc:%Y-%m-%d} to "
                               f"{cert.not_valid_after_utc:%Y-%m-%d}); issue a new one")
    if host is not None and host not in cert_hosts(node.cert):
        raise CertificateError(f"certificate {node.cert} does not name {host} (it names "
                               f"{', '.join(cert_hosts(node.cert))}); issue one with "
                               f"hybridray certs ... --host {host}")


def cert_hosts(cert_path: str | os.PathLike) -> list[str]:
    """The DNS names and IP addresses in a certificate's subject alternative names."""
    x509, *_ = _crypto()
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def local_cert(directory: str | os.PathLike, cluster: str, machine_ip: str) -> NodeCert:
    """A CA (created if ``directory`` has none) and a certificate for this machine.

    Used by ``hybridray up --tls``: every local node, and every driver, presents it.
    """
    directory = Path(directory)
    if not (directory / "ca.crt").exists():
        create_ca(directory, cluster)
    node = issue_node_cert(directory, "local", [machine_ip])
    check_node_cert(node, machine_ip)
    return node
