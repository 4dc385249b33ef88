"""A deployment's secrets directory: the Ray auth token, the cluster CA and host certificates.

Made once on an admin machine by ``hybridray certs``; rendered files refer to these files by
path or Kubernetes Secret name and never contain them. Running it again completes the
directory (new hosts get certificates) and keeps what exists, so it is safe to repeat;
``rotate_token`` replaces the token atomically (docs/deploy.md has the rotation procedure).
"""

from __future__ import annotations

import os
from pathlib import Path

from hybridray.cluster.auth import write_token
from hybridray.deploy.certs import create_ca, issue_node_cert
from hybridray.topology.models import Provider, Topology


def cert_hosts(topology: Topology, head: str | None, extra: list[str]) -> dict[str, list[str]]:
    """Certificate name -> the host names/IPs it must carry, for every machine we know."""
    out: dict[str, list[str]] = {}
    if head:
        host = head.rsplit(":", 1)[0] if head.count(":") == 1 else head
        out["head"] = [host]
    for site in topology.sites.values():
        if site.provider is Provider.static:
            for pool in site.pools:
                for host in pool.hosts:
                    out.setdefault(host, [host])
        elif site.provider is Provider.local:
            from hybridray.cluster.local import _node_ip

            out.setdefault("local", [_node_ip()])
    for host in extra:
        out.setdefault(host, [host])
    return out


def make_secrets(topology: Topology, directory: str | os.PathLike, *, head: str | None = None,
                 hosts: list[str] | tuple[str, ...] = (), rotate_token: bool = False
                 ) -> list[str]:
    """Create or complete ``directory``; returns one line per thing made or kept."""
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
        lines.append(f"{d / 'ca.crt'}: new cluster CA (ca.key is 0600: keep it offline)")
    else:
        lines.append(f"{d / 'ca.crt'}: kept")
    for name, names in cert_hosts(topology, head, list(hosts)).items():
        if (d / "nodes" / f"{name}.crt").exists():
            lines.append(f"{d / 'nodes' / name}.crt: kept")
            continue
        node = issue_node_cert(d, name, names)
        lines.append(f"{node.cert}: for {', '.join(names)}")
    if not head:
        lines.append("no --head-address: issue the head's certificate with "
                     "--head-address HOST when you know it")
    return lines
