"""The README written beside rendered files: what to run, in which order, what to open."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybridray.deploy import network
from hybridray.deploy.common import RenderOptions, etc_dir
from hybridray.deploy.kuberay import names
from hybridray.topology.models import Provider, Topology

if TYPE_CHECKING:
    from hybridray.deploy.render import Rendered


def readme(topology: Topology, options: RenderOptions, out: Rendered) -> str:
    etc = etc_dir(topology)
    head_site = topology.head.site
    head_provider = topology.sites[head_site].provider
    k8s = names(topology)
    lines = [
        f"# Deploying `{topology.name}`",
        "",
        f"Rendered by `hybridray render` for Ray {options.version()}: one Ray cluster across "
        f"{len(topology.sites)} site(s) ({', '.join(topology.sites)}), head at "
        f"`{head_site}`. Token authentication is on for every node"
        f"{' and Ray gRPC TLS (mutual, cluster CA)' if options.tls else ''}. "
        "No file here contains a secret; they refer to the token and certificates by path "
        "(hosts, cloud VMs) or by Kubernetes Secret. See docs/deploy.md in hybridray for the "
        "network assumptions and how to rotate the token and certificates.",
        "",
        "## Files",
        "",
        "| file | what | used by |",
        "|---|---|---|",
    ]
    for rel in sorted(out.files):
        lines.append(f"| `{rel}` | {_what(rel)} | {_used_by(rel, head_site)} |")
    lines += ["", "## 0. Secrets (once, on an admin machine)", "", "```bash",
              f"hybridray certs CLUSTER.yaml --out {options.secrets_dir}"
              + (f" --head-address {options.head_address.rsplit(':', 1)[0]}"
                 if options.head_address else " --head-address HEAD_HOST"),
              "```", "",
              f"This writes `token` (the cluster's Ray auth token, 0600), `ca.crt`/`ca.key` "
              f"and one certificate per host (`nodes/HOST.crt`, `.key`). Copy to each host: "
              f"the token to `{etc}/token` (0600, owned by the Ray user)"
              + (f", and `ca.crt`, `HOST.crt`, `HOST.key` to `{etc}/tls/`" if options.tls
                 else "") + ". Keep `ca.key` offline"
              + (" except where nodes mint their own certificate at boot (cloud VMs via "
                 "`file_mounts`, pods via the CA Secret)." if options.tls else ".")]
    if out.rayclusters:
        lines += ["", "Kubernetes Secrets, in each namespace with a RayCluster:", "", "```bash"]
        for site in out.rayclusters:
            ns = topology.sites[site].namespace
            lines.append(f"kubectl -n {ns} create secret generic {k8s['token_secret']} "
                         f"--from-file=token={options.secrets_dir}/token")
            if options.tls:
                lines.append(f"kubectl -n {ns} create secret generic {k8s['ca_secret']} "
                             f"--from-file=ca.crt={options.secrets_dir}/ca.crt "
                             f"--from-file=ca.key={options.secrets_dir}/ca.key")
        lines.append("```")
    lines += ["", "## 1. The head (first)", ""]
    if head_provider in (Provider.static, Provider.local):
        lines += [f"On the head machine at `{head_site}`: copy `{head_site}/head.sh` to "
                  f"`{etc}/node.sh` and `cluster.env` to `{etc}/cluster.env`, then start "
                  "`hybridray-ray.service` (or run `head.sh` in a terminal)."]
        if out.ray_up:
            site, path = next(iter(out.ray_up.items()))
            lines += ["", f"Its autoscaler launches the `{site}` pools: copy `{path}` to "
                      f"`{etc}/{path}` on the head, and give the head {site} credentials "
                      "(an instance role or the provider's usual credential file) and the SSH "
                      "key the file's `auth` section names."]
    elif head_provider is Provider.kubernetes:
        lines += [f"`kubectl apply -f {out.rayclusters[head_site]}` (KubeRay operator "
                  "installed first). Expose its head Service's GCS port "
                  f"{network.GCS} to the other sites over the private link only (an internal "
                  "load balancer)."]
    else:
        lines += [f"`ray up {out.ray_up[head_site]}` from the admin machine, with the "
                  "provider's credentials in its environment."]
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
        ns = topology.sites[site].namespace
        lines.append(f"- `{site}`: `kubectl -n {ns} create configmap {k8s['head_configmap']} "
                     f"--from-literal=address=HEAD_HOST:6379` (unless rendered with "
                     f"--head-address), then `kubectl apply -f {path}`.")
    for site, path in out.ray_up.items():
        if site != head_site and head_provider not in (Provider.static, Provider.local):
            lines.append(f"- `{site}`: launched by the head's autoscaler from `{path}`.")
    lines += ["", "## 3. Check", "", "```bash",
              f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={options.secrets_dir}/token",
              *(["# TLS: a certificate for this machine (hybridray certs ... --host ADMIN_IP)",
                 f"export RAY_USE_TLS=1 RAY_TLS_CA_CERT={options.secrets_dir}/ca.crt "
                 f"RAY_TLS_SERVER_CERT={options.secrets_dir}/nodes/ADMIN_IP.crt "
                 f"RAY_TLS_SERVER_KEY={options.secrets_dir}/nodes/ADMIN_IP.key"]
                if options.tls else []),
              "ray status --address HEAD_HOST:6379   # every site's nodes, with labels",
              "ray job submit --address http://HEAD_HOST:8265 -- python -c "
              "'import ray; ray.init(); print(ray.nodes())'",
              "```", "", "## Ports", "",
              "All traffic between sites runs over the VPN or private link; none of these "
              "ports is ever opened to the internet.", "",
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
        return "starts the Ray head"
    if "/join-" in rel:
        return "joins one host to the head"
    return {"hybridray-ray.service": "systemd unit running the host's script",
            "cluster.env": "head address and secret paths (no secrets)",
            "node-cert.sh": "mints a node's TLS certificate at boot",
            "README.md": "this file"}.get(rel, "")


def _used_by(rel: str, head_site: str) -> str:
    if rel.endswith("ray-up.yaml"):
        return "`ray up`, or the head's `--autoscaling-config`"
    if rel.endswith("raycluster.yaml"):
        return "`kubectl apply -f`"
    if rel.endswith(".sh") and rel != "node-cert.sh":
        return "systemd (`ETC/node.sh`) or a terminal"
    return "operators"
