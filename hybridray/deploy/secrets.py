"""A deployment's secrets directory: the Ray auth token, the root CA, one intermediate CA per
site, host certificates, and what every node trusts.

Made once on the operator's machine by ``hybridray certs`` (layout: ``hybridray.deploy.certs``);
rendered files refer to these files by path or Kubernetes Secret name and never contain them.
Running it again completes the directory (new sites get an intermediate, new hosts a
certificate) and keeps what exists, so it is safe to repeat; ``rotate_token`` replaces the
token atomically; ``revoke`` stops trusting one site (docs/security.md#trust-per-site).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from hybridray.cluster.auth import write_token
from hybridray.deploy.certs import (
    TRUST,
    create_ca,
    create_site_ca,
    issue_node_cert,
    revoke_site,
    site_dir,
)
from hybridray.exceptions import CertificateError
from hybridray.topology.models import Provider, Topology
from hybridray.topology.syntax import host_port_problem, host_problem


@dataclass
class CertFor:
    """One host certificate to issue: its site and the names/IPs it must carry."""

    site: str
    names: list[str] = field(default_factory=list)


def local_cert_name(site: str) -> str:
    """The certificate a ``provider: local`` site's rendered scripts use (``nodes/NAME.crt``)."""
    return f"local-{site}"


def split_host(address: str) -> str:
    """The host of ``HOST[:PORT]`` (brackets of an IPv6 host removed)."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def check_address(address: str, what: str) -> str:
    """``address`` if it is a host name or IP (with an optional port), else a clear error."""
    why = host_port_problem(address)
    if why:
        raise CertificateError(f"{what} {why}; give the host's name or IP address")
    return address


def _ips(host: str, given: dict[str, str]) -> list[str]:
    """The IP addresses ``host`` is reached at: itself, the ``--host-ip`` given, or DNS."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    if host in given:
        return [given[host]]
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise CertificateError(
            f"host {host!r} does not resolve on this machine, and Ray dials nodes by IP, so "
            f"its certificate needs the IP address: pass --host-ip {host}=IP") from None
    return list(dict.fromkeys(i[4][0] for i in infos))


def cert_hosts(topology: Topology, head: str | None, extra: list[str],
               host_ips: dict[str, str] | None = None) -> dict[str, CertFor]:
    """Certificate name -> (site, host names and IPs), for every machine we know."""
    given = dict(host_ips or {})
    out: dict[str, CertFor] = {}
    if head:
        host = split_host(check_address(head, "--head-address"))
        out["head"] = CertFor(topology.head.site, list(dict.fromkeys([host, *_ips(host, given)])))
    for name, site in topology.sites.items():
        if site.provider is Provider.static:
            for pool in site.pools:
                for host in pool.hosts:
                    out.setdefault(host, CertFor(name, list(dict.fromkeys(
                        [host, *_ips(host, given)]))))
        elif site.provider is Provider.local:
            from hybridray.cluster.local import _node_ip

            out.setdefault(local_cert_name(name), CertFor(name, [_node_ip()]))
    for item in extra:  # --host HOST or --host SITE:HOST (a driver's machine, an admin box)
        site, _, host = item.rpartition("=") if "=" in item else ("", "", item)
        site = site or topology.head.site
        if site not in topology.sites:
            raise CertificateError(f"--host {item}: unknown site {site!r} (sites: "
                                   f"{', '.join(topology.sites)}); use --host SITE=HOST")
        why = host_problem(host)
        if why:
            raise CertificateError(f"--host {item}: {why}")
        out.setdefault(host, CertFor(site, list(dict.fromkeys([host, *_ips(host, given)]))))
    return out


def make_secrets(topology: Topology, directory: str | os.PathLike, *, head: str | None = None,
                 hosts: list[str] | tuple[str, ...] = (), rotate_token: bool = False,
                 host_ips: dict[str, str] | None = None) -> list[str]:
    """Create or complete ``directory``; returns one line per thing made or kept."""
    for name, ip in (host_ips or {}).items():
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise CertificateError(f"--host-ip {name}={ip}: {ip!r} is not an IP "
                                   "address") from None
    wanted = cert_hosts(topology, head, list(hosts), host_ips)  # refuse bad input first
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    lines = []
    token = d / "token"
    if rotate_token or not token.exists():
        tmp = d / f".token.{os.getpid()}"
        write_token(tmp)
        os.replace(tmp, token)
        lines.append(f"{token}: {'new token (rotated)' if rotate_token else 'new token'} "
                     "(0600; copy it to every host, never into a rendered file)")
    else:
        lines.append(f"{token}: kept")
    if not (d / "ca.crt").exists():
        create_ca(d, topology.name)
        lines.append(f"{d / 'ca.crt'}: new root CA (ca.key is 0600: it never leaves this "
                     "machine; it signs site CAs only)")
    else:
        lines.append(f"{d / 'ca.crt'}: kept")
    for site in topology.sites:
        if (site_dir(d, site) / "ca.crt").exists():
            lines.append(f"{site_dir(d, site)}/ca.crt: kept")
        else:
            create_site_ca(d, topology.name, site)
            lines.append(f"{site_dir(d, site)}/ca.crt: new intermediate CA for site {site} "
                         "(its ca.key goes only to that site's machines that mint certificates)")
    for name, want in wanted.items():
        if (d / "nodes" / f"{name}.crt").exists():
            lines.append(f"{d / 'nodes' / name}.crt: kept")
            continue
        node = issue_node_cert(d, name, want.names, site=want.site)
        lines.append(f"{node.cert}: site {want.site}, for {', '.join(want.names)}")
    lines.append(f"{d / TRUST}: what every node trusts (its RAY_TLS_CA_CERT): the site CAs")
    if not head:
        lines.append("no --head-address: issue the head's certificate with "
                     "--head-address HOST when you know it")
    return lines


def revoke(topology: Topology, directory: str | os.PathLike, site: str) -> list[str]:
    """Revoke ``site``'s intermediate and rotate the token its nodes held."""
    if site not in topology.sites:
        raise CertificateError(f"--revoke-site {site}: unknown site (sites: "
                               f"{', '.join(topology.sites)})")
    d = Path(directory)
    lines = revoke_site(d, site)
    tmp = d / f".token.{os.getpid()}"
    write_token(tmp)
    os.replace(tmp, d / "token")
    lines.append(f"{d / 'token'}: rotated (the revoked site's nodes held the old one)")
    return lines
