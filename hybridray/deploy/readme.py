"""The README written beside rendered files: what to run, in which order, what to open.

Every value it prints into a command line is shell-quoted (``shlex.quote``), though the
topology's values are already label- and host-safe (``hybridray.topology.syntax``).
"""

from __future__ import annotations

from shlex import quote
from typing import TYPE_CHECKING

from hybridray.deploy import network
from hybridray.deploy.common import RenderOptions, etc_dir
from hybridray.deploy.hosts import cert_name
from hybridray.deploy.kuberay import AUTH_TOKEN_KEY, names
from hybridray.topology.models import Provider, Topology

if TYPE_CHECKING:
    from hybridray.deploy.render import Rendered


def readme(topology: Topology, options: RenderOptions, out: Rendered) -> str:
    etc = etc_dir(topology)
    head_site = topology.head.site
    head_provider = topology.sites[head_site].provider
    k8s = names(topology)
    secrets = options.secrets_dir
    lines = [
        f"# Deploying `{topology.name}`",
        "",
        f"Rendered by `hybridray render` for Ray {options.version()}: one Ray cluster across "
        f"{len(topology.sites)} site(s) ({', '.join(topology.sites)}), head at "
        f"`{head_site}`. Token authentication is on for every node"
        f"{' and Ray gRPC TLS (mutual; one intermediate CA per site)' if options.tls else ''}."
        " No file here contains a secret; they refer to the token and certificates by path "
        "(hosts, cloud VMs) or by Kubernetes Secret. docs/deploy.md and docs/security.md in "
        "hybridray explain the network assumptions, rotation and revocation.",
        "",
        "## Files",
        "",
        "| file | what | used by |",
        "|---|---|---|",
    ]
    for rel in sorted(out.files):
        lines.append(f"| `{rel}` | {_what(rel)} | {_used_by(rel)} |")
    head_host = options.head_address.rsplit(":", 1)[0] if options.head_address else "HEAD_HOST"
    lines += ["", "## 0. Secrets (once, on the operator's machine)", "", "```bash",
              f"hybridray certs CLUSTER.yaml --out {quote(secrets)} --head-address "
              f"{quote(head_host)}", "```", "",
              "This writes `token` (the cluster's Ray auth token, 0600), the root CA "
              "(`ca.crt`; `ca.key` never leaves that machine), one intermediate CA per site "
              "(`sites/SITE/ca.crt`, `ca.key`), `trust.pem` (what every node trusts: the site "
              "CAs) and one certificate per host (`nodes/NAME.crt` with its site CA, `.key`). "
              "A host whose name does not resolve there needs `--host-ip NAME=IP`."]
    if out.scripts:
        lines += ["", "Copy to each host: `token` to "
                  f"`{etc}/token` (0600, owned by the Ray user)"
                  + (f", and `trust.pem` as `{etc}/tls/ca.crt` plus the host's own "
                     f"`nodes/NAME.crt` and `.key` to `{etc}/tls/`" if options.tls else "")
                  + "; each script's `TLS file ... is missing` message names its files."]
        rows = [(s, out.hosts[s], cert_name(topology, site, out.hosts[s]) if "/join-" in s
                 else "head") for site, scripts in out.scripts.items() for s in scripts]
        if options.tls:
            lines += ["", "| script | host | certificate (`nodes/`) |", "|---|---|---|"]
            lines += [f"| `{s}` | {h} | `{c}.crt` |" for s, h, c in rows]
    if out.rayclusters:
        lines += ["", "Kubernetes Secrets, in each namespace with a RayCluster (the token "
                  f"under the key `{AUTH_TOKEN_KEY}` that KubeRay's `authOptions` reads; the "
                  "site's own CA, never the root's):", "", "```bash"]
        for site in out.rayclusters:
            ns = quote(topology.sites[site].namespace or "")
            lines.append(f"kubectl -n {ns} create secret generic {k8s['token_secret']} "
                         f"--from-file={AUTH_TOKEN_KEY}={quote(secrets + '/token')}")
            if options.tls:
                sd = f"{secrets}/sites/{site}"
                lines.append(f"kubectl -n {ns} create secret generic "
                             f"{names(topology, site)['ca_secret']} "
                             f"--from-file=site-ca.crt={quote(sd + '/ca.crt')} "
                             f"--from-file=site-ca.key={quote(sd + '/ca.key')} "
                             f"--from-file=ca.crt={quote(secrets + '/trust.pem')}")
        lines.append("```")
    lines += ["", "## 1. The head (first)", ""]
    if head_provider in (Provider.static, Provider.local):
        lines += [f"On the head machine at `{head_site}`: copy `{head_site}/head.sh` to "
                  f"`{etc}/node.sh` and `cluster.env` to `{etc}/cluster.env`, then start "
                  "`hybridray-ray.service` (or run `head.sh` in a terminal)."]
        if out.ray_up:
            site, path = next(iter(out.ray_up.items()))
            lines += ["", f"Its autoscaler launches the `{site}` pools without `ray up`: copy "
                      f"the `{site}/` directory to `{etc}/{site}/` on the head"
                      + (f", and `sites/{site}/ca.crt` and `ca.key` from the secrets to "
                         f"`{etc}/sites/{site}/` (0600; the VMs mint their certificates with "
                         "it and delete it)" if options.tls else "")
                      + f". Give the head {site} credentials (an instance role or the "
                      "provider's credential file) and the SSH private key named in the file's "
                      "`auth.ssh_private_key`; its `node_config`s already name the subnets, "
                      "security groups, key pair and AMIs given at render time."]
    elif head_provider is Provider.kubernetes:
        lines += [f"`kubectl apply -f {out.rayclusters[head_site]}` (KubeRay operator "
                  "installed first). Expose its head Service's GCS port "
                  f"{network.GCS} to the other sites over the private link only (an internal "
                  "load balancer)."]
    else:
        lines += [f"`ray up {out.ray_up[head_site]}` from this machine (it reads the token, "
                  f"`trust.pem` and `sites/{head_site}/` from `{secrets}`), with the provider's "
                  "credentials in its environment."]
    lines += ["", "Note the head's address as the other sites reach it (`HOST:6379`); "
              "it is `HYBRIDRAY_HEAD_ADDRESS` in `cluster.env` and the "
              f"`{k8s['head_configmap']}` ConfigMap.", "", "## 2. The other sites", ""]
    for site, scripts in out.scripts.items():
        for s in scripts:
            if s.endswith("head.sh"):
                continue
            lines.append(f"- `{site}`, host `{out.hosts[s]}`: copy `{s}` to `{etc}/node.sh` "
                         "and `cluster.env` to its directory, then "
                         "`systemctl enable --now hybridray-ray`.")
    for site, path in out.rayclusters.items():
        if site == head_site:
            continue
        ns = quote(topology.sites[site].namespace or "")
        lines.append(f"- `{site}`: `kubectl -n {ns} create configmap {k8s['head_configmap']} "
                     f"--from-literal=address={quote(options.gcs_address('HEAD_HOST') or '')}`"
                     " (read by its workers and by its autoscaler, which scales this site for "
                     f"the head's demand), then `kubectl apply -f {path}`.")
    for site, path in out.ray_up.items():
        if site != head_site and head_provider not in (Provider.static, Provider.local):
            lines.append(f"- `{site}`: launched by the head's autoscaler from `{path}`.")
    lines += ["", "## 3. Check", "", "```bash",
              f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={quote(secrets + '/token')}",
              *(["# TLS: a certificate for this machine (hybridray certs ... --host ADMIN_IP)",
                 f"export RAY_USE_TLS=1 RAY_TLS_CA_CERT={quote(secrets + '/trust.pem')} "
                 f"RAY_TLS_SERVER_CERT={quote(secrets + '/nodes/ADMIN_IP.crt')} "
                 f"RAY_TLS_SERVER_KEY={quote(secrets + '/nodes/ADMIN_IP.key')}"]
                if options.tls else []),
              "ray status --address HEAD_HOST:6379   # every site's nodes, with labels",
              "```", "", "## Ports", "",
              "All traffic between sites runs over the VPN or private link; none of these "
              "ports is ever opened to the internet. Every `ray start` these files run passes "
              "them explicitly (host scripts, `ray up` start commands, KubeRay "
              "`rayStartParams`)"
              + (", except the node ports of `provider: local` sites, whose nodes share one "
                 "machine and let Ray pick free ones" if any(
                     s.provider is Provider.local for s in topology.sites.values()) else "")
              + ".", "",
              "| port(s) | listens on | must be reachable from | what | expose to |",
              "|---|---|---|---|---|"]
    for rule in network.RULES:
        lines.append(f"| {rule.ports} | {rule.on} | {rule.source} | {rule.why} | "
                     f"{rule.expose} |")
    pairs = [f"{a} <-> {b}" for i, a in enumerate(topology.sites)
             for b in list(topology.sites)[i + 1:]]
    if pairs:
        lines += ["", "Site pairs that need the `sites` ports open both ways: "
                  + ", ".join(pairs) + ". Ray workers call each other directly, so this is "
                  "every pair, not only site-to-head."]
    return "\n".join(lines) + "\n"


def _what(rel: str) -> str:
    if rel.endswith("ray-up.yaml"):
        return "Ray cluster-launcher config: node types per pool, labels, resources"
    if rel.endswith("raycluster.yaml"):
        return "KubeRay RayCluster: one worker group per pool"
    if rel.endswith("head.sh"):
        return "starts the Ray head (service loop)"
    if "/join-" in rel:
        return "joins one host to the head (service loop)"
    if rel.endswith("node-cert.sh"):
        return "mints a VM's TLS certificate at boot with its site's CA"
    return {"hybridray-ray.service": "systemd unit running the host's script",
            "cluster.env": "head address and secret paths (no secrets)",
            "README.md": "this file"}.get(rel, "")


def _used_by(rel: str) -> str:
    if rel.endswith("ray-up.yaml"):
        return "`ray up`, or the head's `--autoscaling-config`"
    if rel.endswith("raycluster.yaml"):
        return "`kubectl apply -f`"
    if rel.endswith("node-cert.sh"):
        return "the ray up file's setup commands (`file_mounts`)"
    if rel.endswith(".sh"):
        return "systemd (`ETC/node.sh`), a terminal, or a rehearsal"
    return "operators"
