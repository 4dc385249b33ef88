"""A cluster's certificate authority, one intermediate CA per site, and node certificates.

Ray's gRPC TLS (``RAY_USE_TLS=1``) is mutual: every node and every driver presents a
certificate, and each side accepts the other only when it chains to what it trusts
(``RAY_TLS_CA_CERT``). A hybrid cluster spans sites that trust each other differently, so:

* the **root CA** (``ca.crt``/``ca.key``) signs only site intermediates. Its key never leaves
  the operator's machine (no rendered file refers to it);
* each site gets an **intermediate CA** (``sites/SITE/ca.crt``/``ca.key``, path length 0).
  Machines that mint their own certificate at boot (cloud VMs, pods) receive *their* site's
  intermediate and key, never another site's and never the root's;
* every node trusts ``trust.pem``: the intermediates of the sites not revoked, **not the
  root**. gRPC checks no CRLs, so revocation is done by what nodes trust: ``revoke_site``
  drops the site's intermediate from ``trust.pem``; after nodes restart with the new file, a
  certificate of the revoked site no longer chains to anything they trust, while the other
  sites' certificates still do (gRPC's TLS accepts an intermediate as a trust anchor; tested
  in ``tests/deploy/test_trust.py`` with a handshake built as Ray builds its channels).

Layout of a secrets directory (``hybridray certs``)::

    DIR/token               the cluster's Ray auth token (0600)
    DIR/ca.crt, ca.key      the root CA (key 0600: stays on the operator's machine)
    DIR/trust.pem           what every node trusts (RAY_TLS_CA_CERT): site intermediates
    DIR/sites/SITE/ca.crt   SITE's intermediate; ca.key its key (0600, to SITE's minters only)
    DIR/nodes/NAME.crt      a host's certificate + its site's intermediate (the chain it sends)
    DIR/nodes/NAME.key      its key (0600)
    DIR/revoked.json        sites revoked, with their intermediates' fingerprints
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from hybridray.exceptions import CertificateError

CA_DAYS = 3650
SITE_CA_DAYS = 1825
NODE_DAYS = 365
LOCAL_NAMES = ("localhost", "127.0.0.1")
TRUST = "trust.pem"
REVOKED = "revoked.json"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class NodeCert:
    """Where one node's certificate (chain), key and the trust bundle lie."""

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
                               'pip install "hybridray[aws]" (or: pip install '
                               'cryptography)') from None
    return x509, hashes, serialization, ec, NameOID, ExtendedKeyUsageOID


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    _, _, serialization, *_ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert) -> bytes:
    _, _, serialization, *_ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca_usage(x509):
    return x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                         content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def create_ca(directory: str | os.PathLike, cluster: str) -> Path:
    """Write the root ``ca.crt`` and ``ca.key`` (0600) for ``cluster`` into ``directory``.

    Its path length is 1: it signs site intermediates, which sign node certificates.

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
                      x509.NameAttribute(NameOID.COMMON_NAME, f"hybridray {cluster} root CA")])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_usage(x509), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write(directory / "ca.key", _key_pem(key), 0o600)
    _write(directory / "ca.crt", _pem(cert), 0o644)
    return directory / "ca.crt"


def site_dir(directory: str | os.PathLike, site: str) -> Path:
    return Path(directory) / "sites" / _SAFE.sub("_", site)


def create_site_ca(directory: str | os.PathLike, cluster: str, site: str) -> Path:
    """Write ``sites/SITE/ca.crt`` and ``ca.key``: ``site``'s intermediate, signed by the root.

    Path length 0: it signs node certificates only. Adds it to ``trust.pem``.

    Raises:
        CertificateError: no root CA in ``directory``, or ``site`` already has one.
    """
    x509, hashes, _, ec, NameOID, _ = _crypto()
    root_cert, root_key = _load_pair(Path(directory), "ca")
    out = site_dir(directory, site)
    if (out / "ca.crt").exists():
        raise CertificateError(f"site {site!r} already has an intermediate CA in {out}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hybridray"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"site {site}"),
                x509.NameAttribute(NameOID.COMMON_NAME,
                                   f"hybridray {cluster} site {site} CA "
                                   f"{now:%Y%m%d%H%M%S}")]))
            .issuer_name(root_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=SITE_CA_DAYS),
                                 root_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_usage(x509), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    _write(out / "ca.key", _key_pem(key), 0o600)
    _write(out / "ca.crt", _pem(cert), 0o644)
    write_trust(directory)
    return out / "ca.crt"


def issue_node_cert(directory: str | os.PathLike, name: str, hosts: list[str],
                    site: str) -> NodeCert:
    """A certificate for one machine of ``site``, signed by that site's intermediate.

    Args:
        directory: a secrets directory with ``sites/SITE/ca.*`` (``create_site_ca``).
        name: the file name stem (``nodes/NAME.crt``), usually the host name.
        hosts: host names and IP addresses other nodes use to reach it (IPs become IP SANs,
            names DNS SANs); ``localhost`` and ``127.0.0.1`` are always added (Ray dials some
            local services on loopback).
        site: the site the machine belongs to.

    The certificate file holds the chain the node sends: its certificate, then the site's
    intermediate.
    """
    x509, hashes, _, ec, NameOID, EKU = _crypto()
    directory = Path(directory)
    ca_cert, ca_key = _load_pair(site_dir(directory, site), "ca", site=site)
    sans: list = []
    for host in dict.fromkeys([*hosts, *LOCAL_NAMES]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"site {site}"),
                x509.NameAttribute(NameOID.COMMON_NAME, (hosts[0] if hosts else name)[:64])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=NODE_DAYS),
                                 ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH, EKU.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    stem = _SAFE.sub("_", name)
    out = NodeCert(cert=directory / "nodes" / f"{stem}.crt",
                   key=directory / "nodes" / f"{stem}.key", ca=directory / TRUST)
    _write(out.key, _key_pem(key), 0o600)
    _write(out.cert, _pem(cert) + _pem(ca_cert), 0o644)
    if not out.ca.exists():
        write_trust(directory)
    return out


def _load_pair(directory: Path, stem: str, site: str | None = None):
    x509, _, serialization, *_ = _crypto()
    crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    if not crt.is_file() or not key.is_file():
        if site is not None:
            raise CertificateError(
                f"site {site!r} has no intermediate CA ({directory}/ca.crt and ca.key); make "
                f"it with: hybridray certs CLUSTER.yaml --out {directory.parent.parent}")
        raise CertificateError(f"{directory} holds no cluster CA (ca.crt and ca.key); "
                               f"create one with: hybridray certs CLUSTER.yaml --out {directory}")
    return (x509.load_pem_x509_certificate(crt.read_bytes()),
            serialization.load_pem_private_key(key.read_bytes(), None))


def fingerprint(cert_pem: bytes) -> str:
    x509, *_ = _crypto()
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(
        _crypto()[2].Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def revoked(directory: str | os.PathLike) -> dict[str, list[str]]:
    """Site -> fingerprints of its revoked intermediates."""
    path = Path(directory) / REVOKED
    return json.loads(path.read_text()) if path.is_file() else {}


def write_trust(directory: str | os.PathLike) -> Path:
    """(Re)write ``trust.pem``: every site intermediate not revoked, and never the root."""
    directory = Path(directory)
    bad = {fp for fps in revoked(directory).values() for fp in fps}
    parts = []
    for crt in sorted((directory / "sites").glob("*/ca.crt")):
        pem = crt.read_bytes()
        if fingerprint(pem) not in bad:
            parts.append(pem)
    _write(directory / TRUST, b"".join(parts), 0o644)
    return directory / TRUST


def revoke_site(directory: str | os.PathLike, site: str) -> list[str]:
    """Stop trusting ``site``: record its intermediate's fingerprint, drop it from
    ``trust.pem``, move its intermediate and its hosts' certificates to ``revoked/``.

    Nodes keep trusting what they loaded at start: the revocation takes effect when every
    node of the other sites restarts with the new ``trust.pem`` (docs/security.md).

    Raises:
        CertificateError: ``site`` has no intermediate in ``directory``.
    """
    directory = Path(directory)
    src = site_dir(directory, site)
    if not (src / "ca.crt").is_file():
        have = sorted(p.name for p in (directory / "sites").glob("*"))
        raise CertificateError(f"site {site!r} has no intermediate CA in {src}; nothing to "
                               f"revoke (sites with one: {', '.join(have) or 'none'})")
    pem = (src / "ca.crt").read_bytes()
    record = revoked(directory)
    record.setdefault(site, []).append(fingerprint(pem))
    _write(directory / REVOKED, json.dumps(record, indent=2).encode(), 0o644)
    stamp = _now().strftime("%Y%m%dT%H%M%S")
    dest = directory / "revoked" / f"{_SAFE.sub('_', site)}-{stamp}"
    dest.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest / "site")
    lines = [f"site {site}: intermediate {fingerprint(pem)[:16]}... revoked; moved to {dest}"]
    nodes = directory / "nodes"
    for crt in sorted(nodes.glob("*.crt")) if nodes.is_dir() else []:
        chain = crt.read_bytes()
        if pem in chain:  # this host's certificate was signed by the revoked intermediate
            for path in (crt, crt.with_suffix(".key")):
                if path.exists():
                    (dest / "nodes").mkdir(exist_ok=True)
                    shutil.move(str(path), dest / "nodes" / path.name)
            lines.append(f"{crt}: revoked with its site")
    write_trust(directory)
    lines.append(f"{directory / TRUST}: rewritten without {site}; copy it to every node of "
                 "the other sites and restart them (docs/security.md#trust-per-site)")
    return lines


def _chain(path: Path) -> list:
    x509, *_ = _crypto()
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError as e:
        raise CertificateError(f"cannot read the TLS certificate(s) in {path} ({e}); they "
                               "must be PEM") from None


def check_node_cert(node: NodeCert, host: str | None = None) -> None:
    """Refuse a certificate Ray would reject only later, with a vaguer error.

    Checks that the three files exist and parse, that the key belongs to the certificate,
    that the certificate was signed by a CA in the trust bundle (directly, or through the
    intermediate sent with it) and is valid now, and (with ``host``) that it names ``host``
    among its SANs.

    Raises:
        CertificateError: naming the file and the fix.
    """
    _, _, serialization, *_ = _crypto()
    from cryptography.exceptions import InvalidSignature

    for what, path in (("certificate", node.cert), ("key", node.key), ("CA", node.ca)):
        if not Path(path).is_file():
            raise CertificateError(f"TLS {what} {path} does not exist; create it with "
                                   "hybridray certs CLUSTER.yaml --out DIR")
    chain, trusted = _chain(node.cert), _chain(node.ca)
    if not chain or not trusted:
        raise CertificateError(f"{node.cert if not chain else node.ca} holds no certificate; "
                               "issue it again with hybridray certs")
    cert = chain[0]
    try:
        key = serialization.load_pem_private_key(Path(node.key).read_bytes(), None)
    except ValueError as e:
        raise CertificateError(f"cannot read the TLS key {node.key} ({e}); it must be PEM, "
                               "unencrypted") from None
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise CertificateError(f"TLS key {node.key} does not belong to certificate "
                               f"{node.cert}; issue both again with hybridray certs")

    def signed_by(child, parent) -> bool:
        try:
            child.verify_directly_issued_by(parent)
            return True
        except (ValueError, TypeError, InvalidSignature):
            return False

    anchors = [c for c in trusted]
    if not any(signed_by(cert, a) for a in anchors) and not any(
            signed_by(cert, mid) and any(signed_by(mid, a) or mid == a for a in anchors)
            for mid in chain[1:]):
        raise CertificateError(
            f"certificate {node.cert} was not signed by the cluster CA {node.ca} (issuer "
            f"{cert.issuer.rfc4514_string()!r}); every node needs a certificate from a site CA "
            "that this trust bundle holds (not revoked): issue it with hybridray certs using "
            "that CA's directory")
    now = _now()
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
    cert = _chain(Path(cert_path))[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


LOCAL_SITE = "local"


def local_cert(directory: str | os.PathLike, cluster: str, machine_ip: str) -> NodeCert:
    """A root CA, a ``local`` site intermediate (created if missing) and a certificate for
    this machine. Used by ``hybridray up --tls``: every local node, and every driver,
    presents it."""
    directory = Path(directory)
    if not (directory / "ca.crt").exists():
        create_ca(directory, cluster)
    if not (site_dir(directory, LOCAL_SITE) / "ca.crt").exists():
        create_site_ca(directory, cluster, LOCAL_SITE)
    node = issue_node_cert(directory, "local", [machine_ip], site=LOCAL_SITE)
    check_node_cert(node, machine_ip)
    return node
