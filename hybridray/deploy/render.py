"""``hybridray render``: every file operators run to bring a topology up for real.

Per site, by provider: join scripts for static hosts (and local sites, on 127.0.0.1), a
``ray up`` file for aws and gcp, a KubeRay ``RayCluster`` for kubernetes; plus a README with
the order to run them in and the ports each site must open. Everything is built in memory
and checked first (a provider it cannot produce, a missing region, project or namespace, a
``ray up`` file Ray's schema refuses), then written to a temporary directory beside the
target and renamed into place: the target holds a whole set of files or none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hybridray.deploy import hosts, kuberay, rayup
from hybridray.deploy.common import RenderOptions
from hybridray.deploy.mint import NODE_CERT_SH
from hybridray.deploy.readme import readme
from hybridray.exceptions import DeployError
from hybridray.topology.models import Provider, Topology

VM_PROVIDERS = (Provider.aws, Provider.gcp, Provider.azure)
HOST_PROVIDERS = (Provider.static, Provider.local)


@dataclass
class Rendered:
    """The files of one render, by path relative to the output directory."""

    files: dict[str, str] = field(default_factory=dict)
    executable: set[str] = field(default_factory=set)
    ray_up: dict[str, str] = field(default_factory=dict)       # site -> path
    rayclusters: dict[str, str] = field(default_factory=dict)  # site -> path
    scripts: dict[str, list[str]] = field(default_factory=dict)  # site -> paths
    hosts: dict[str, str] = field(default_factory=dict)  # script path -> the host it runs on

    def add(self, path: str, text: str, executable: bool = False) -> None:
        self.files[path] = text
        if executable:
            self.executable.add(path)


def build(topology: Topology, options: RenderOptions | None = None) -> Rendered:
    """Render ``topology`` in memory; raises ``DeployError`` before anything is written."""
    options = options or RenderOptions()
    _check_shape(topology)
    out = Rendered()
    head_site = topology.head.site
    vm_sites = [n for n, s in topology.sites.items() if s.provider in VM_PROVIDERS]
    autoscaled = vm_sites[0] if vm_sites else None
    for name, site in topology.sites.items():
        if site.provider in VM_PROVIDERS:
            config = rayup.ray_up_config(topology, name, options)
            rayup.validate_ray_up(config)
            path = f"{name}/ray-up.yaml"
            use = (f"ray up {path}" if head_site == name else
                   f"the head's autoscaler: ray start --head --autoscaling-config {path}")
            out.add(path, _yaml(config, f"used by {use}"))
            out.ray_up[name] = path
            if options.tls:
                out.add(f"{name}/{rayup.NODE_CERT_SCRIPT}", NODE_CERT_SH, executable=True)
    for name, site in topology.sites.items():
        if site.provider in HOST_PROVIDERS:
            scripts = []
            if head_site == name:
                config = (f"/etc/hybridray/{topology.name}/{out.ray_up[autoscaled]}"
                          if autoscaled else None)
                out.add(f"{name}/head.sh", hosts.head_script(topology, options, "head",
                                                             config), executable=True)
                scripts.append(f"{name}/head.sh")
                out.hosts[f"{name}/head.sh"] = options.head_address or "the head machine"
            for host, pool, index in hosts.site_hosts(topology, name):
                path = f"{name}/join-{pool.name}-{index}.sh"
                out.add(path, hosts.join_script(topology, options, name, pool, index, host),
                        executable=True)
                out.hosts[path] = host
                scripts.append(path)
            out.scripts[name] = scripts
        elif site.provider is Provider.kubernetes:
            path = f"{name}/raycluster.yaml"
            manifest = kuberay.raycluster(topology, name, options)
            out.add(path, _yaml(manifest, f"kubectl apply -f {path}"))
            out.rayclusters[name] = path
    if out.scripts:
        out.add("hybridray-ray.service", hosts.systemd_unit(topology))
        out.add("cluster.env", hosts.cluster_env(topology, options))
    out.add("README.md", readme(topology, options, out))
    return out


def _check_shape(topology: Topology) -> None:
    """What one Ray head cannot do, said before anything is rendered."""
    vm_sites = [n for n, s in topology.sites.items() if s.provider in VM_PROVIDERS]
    for name in vm_sites:
        if topology.sites[name].provider.value not in rayup.PROVIDERS:
            rayup.ray_up_config(topology, name, RenderOptions())  # raises the provider error
    if len(vm_sites) > 1:
        raise DeployError(
            f"sites {', '.join(vm_sites)}: one Ray head runs one autoscaler, for one cloud "
            "provider config, so only one site may be autoscaled VMs; run the others on "
            "Kubernetes (provider: kubernetes) or as static hosts")
    head = topology.sites[topology.head.site]
    if vm_sites and head.provider is Provider.kubernetes:
        raise DeployError(
            f"head.site: the head runs on Kubernetes (site {topology.head.site!r}), whose "
            f"autoscaler only scales pods, so it cannot launch the VMs of site "
            f"{vm_sites[0]!r}; put the head at {vm_sites[0]!r} or at a static site")


def write(rendered: Rendered, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Write every file into ``out_dir`` at once (temporary directory, then rename).

    Raises:
        DeployError: ``out_dir`` exists and is not empty (without ``force``), or cannot be
            written; nothing is left behind in either case.
    """
    target = Path(out_dir).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise DeployError(f"{target} exists and is not empty; render into a new directory, "
                          "or pass --force to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise DeployError(f"cannot write under {target.parent}: {e}") from None
    try:
        for rel, text in rendered.files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            os.chmod(path, 0o755 if rel in rendered.executable else 0o644)
        os.chmod(tmp, 0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise DeployError(f"cannot write {target}: {e}; nothing was written") from None
    return target


def render(topology: Topology, out_dir: str | os.PathLike,
           options: RenderOptions | None = None, *, force: bool = False) -> Rendered:
    """Render ``topology`` into ``out_dir``: all files or, on any error, none."""
    options = options or RenderOptions()
    if options.deploy_dir is None:  # ray up's file_mounts name files beside it, absolutely
        options = dataclasses.replace(options, deploy_dir=str(Path(out_dir).absolute()))
    rendered = build(topology, options)
    write(rendered, out_dir, force=force)
    return rendered


def _yaml(data: dict, used_by: str) -> str:
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)
    return f"# Generated by hybridray render; {used_by}\n{body}"
