"""What every rendered file shares: render options, where secrets live on a machine, and the
environment a node needs for the cluster's token auth and TLS.

Secrets are never written into rendered files. Files *refer* to them: the token and TLS files
live under ``/etc/hybridray/CLUSTER/`` on hosts (copied there by the operator), come from
``file_mounts`` on cloud nodes, and from Kubernetes Secrets in pods.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from hybridray.cluster.plan import NodeSpec, head_spec, node_args, pool_spec
from hybridray.exceptions import ClusterError, DeployError
from hybridray.topology.models import NodePool, Topology


@dataclass(frozen=True)
class RenderOptions:
    """Settings that are about *deploying* a topology rather than the topology itself.

    Attributes:
        head_address: ``HOST[:PORT]`` of the head's GCS as other sites reach it; baked into
            Kubernetes manifests (otherwise they read it from a ConfigMap) and into scripts
            as the default (otherwise they read it from ``cluster.env``).
        tls: render Ray's gRPC TLS settings (``RAY_USE_TLS=1``) into every node.
        secrets_dir: where, on the machine that runs ``ray up``, the token and certificates
            made by ``hybridray certs`` lie (referenced by ``file_mounts``).
        gcp_project: the GCP project for ``provider: gcp`` sites (cluster files hold none).
        ray_version: the Ray version images and ``pip install`` lines pin.
        image: container image for Kubernetes pods (default ``rayproject/ray:VERSION``, and
            ``rayproject/ray:VERSION-gpu`` for pools with GPUs).
        gpu_image: container image for Kubernetes pods of GPU pools (default: ``image`` with
            ``-gpu`` appended to its tag, or ``rayproject/ray:VERSION-gpu``).
        aws_subnets, aws_security_groups, ssh_key_name, ssh_private_key, aws_ami, aws_gpu_ami:
            what Ray's AWS node provider needs in every ``node_config`` when no ``ray up``
            bootstrap fills it in (the head runs at another site): subnet and security group
            ids, the EC2 key pair's name and its private key's path on the head, and the AMI
            for CPU and GPU pools. With the head at the AWS site, ``ray up`` fills in what is
            not given.
        deploy_dir: where the rendered files lie on the machine that runs ``ray up`` (absolute
            ``file_mounts`` sources; set by ``render`` to ``--out``).
    """

    head_address: str | None = None
    tls: bool = True
    secrets_dir: str = "./secrets"
    gcp_project: str | None = None
    ray_version: str = ""
    image: str | None = None
    gpu_image: str | None = None
    aws_subnets: tuple[str, ...] = ()
    aws_security_groups: tuple[str, ...] = ()
    ssh_key_name: str | None = None
    ssh_private_key: str | None = None
    aws_ami: str | None = None
    aws_gpu_ami: str | None = None
    deploy_dir: str | None = None

    def __post_init__(self) -> None:
        """Refuse values that would land unquoted in a file or a shell word."""
        from hybridray.topology.syntax import host_port_problem

        if self.head_address is not None:
            why = host_port_problem(self.head_address)
            if why:
                raise DeployError(f"--head-address {why}; give HOST[:PORT] of the head's GCS")
        checks = [("--aws-subnet", v, r"subnet-[0-9a-f]{8,17}") for v in self.aws_subnets]
        checks += [("--aws-security-group", v, r"sg-[0-9a-f]{8,17}")
                   for v in self.aws_security_groups]
        checks += [(f, v, r"ami-[0-9a-f]{8,17}") for f, v in
                   (("--aws-ami", self.aws_ami), ("--aws-gpu-ami", self.aws_gpu_ami)) if v]
        if self.ssh_key_name:
            checks.append(("--ssh-key-name", self.ssh_key_name,
                           r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}"))
        for what in ("ssh_private_key", "secrets_dir", "deploy_dir"):
            value = getattr(self, what)
            if value:
                checks.append((f"--{what.replace('_', '-')}", value, r"[A-Za-z0-9_./~+-]+"))
        for image in (self.image, self.gpu_image):
            if image:
                checks.append(("--image", image, r"[A-Za-z0-9][A-Za-z0-9_./:@+-]*"))
        for flag, value, pattern in checks:
            if not re.fullmatch(pattern, value):
                raise DeployError(f"{flag} {value!r}: must match {pattern} (no spaces, quotes "
                                  "or shell characters)")

    def version(self) -> str:
        if self.ray_version:
            return self.ray_version
        from importlib.metadata import version

        return version("ray")

    def container_image(self, gpus: int = 0) -> str:
        """The pod image: Ray's CPU image, or its ``-gpu`` image for a pool with GPUs."""
        if gpus:
            if self.gpu_image:
                return self.gpu_image
            if self.image:
                return self.image if self.image.endswith("-gpu") else f"{self.image}-gpu"
            return f"rayproject/ray:{self.version()}-gpu"
        return self.image or f"rayproject/ray:{self.version()}"

    def gcs_address(self, default_host: str | None = None) -> str | None:
        host = self.head_address or default_host
        if host is None:
            return None
        if host.startswith("["):
            return host if "]:" in host else f"{host}:6379"
        return host if host.count(":") == 1 else (f"[{host}]:6379" if ":" in host
                                                   else f"{host}:6379")


def etc_dir(topology: Topology) -> PurePosixPath:
    """Where a machine keeps this cluster's token, certificates and ``cluster.env``."""
    return PurePosixPath("/etc/hybridray") / topology.name


def token_path(topology: Topology) -> str:
    return str(etc_dir(topology) / "token")


def tls_paths(topology: Topology) -> dict[str, str]:
    """Where a node's certificate, key and the CA lie on the node itself."""
    d = etc_dir(topology) / "tls"
    return {"RAY_TLS_SERVER_CERT": str(d / "node.crt"), "RAY_TLS_SERVER_KEY": str(d / "node.key"),
            "RAY_TLS_CA_CERT": str(d / "ca.crt")}


def node_env(topology: Topology, options: RenderOptions) -> dict[str, str]:
    """Token auth (always) and TLS (with ``options.tls``) for a node or driver."""
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path(topology),
           "RAY_USAGE_STATS_ENABLED": "0"}
    if options.tls:
        env["RAY_USE_TLS"] = "1"
        env.update(tls_paths(topology))
    return env


def head_node(topology: Topology) -> NodeSpec:
    return _spec(lambda: head_spec(topology))


def pool_node(topology: Topology, site: str, pool: NodePool, index: int = 0) -> NodeSpec:
    return _spec(lambda: pool_spec(topology, site, pool, index))


def _spec(build) -> NodeSpec:
    try:
        return build()
    except ClusterError as e:  # fractional CPUs: Ray's --num-cpus takes whole CPUs
        raise DeployError(str(e).replace("a local node", "a Ray node")) from None


def declared_args(spec: NodeSpec) -> list[str]:
    """``ray start`` arguments declaring what ``spec`` offers (shared with local nodes)."""
    return node_args(spec)


def int_resources(spec: NodeSpec, where: str) -> dict[str, int]:
    """Ray's cluster-launcher and KubeRay take whole resource amounts; say which is not."""
    out = {}
    for name, amount in spec.resources.items():
        if amount != int(amount):
            raise DeployError(f"{where}.resources.{name}: the ray up file takes whole amounts "
                              f"(got {amount}); scale the resource (e.g. "
                              f"{name}: {int(amount * 1000)} for milli-units)")
        out[name] = int(amount)
    return out


def json_compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=False)
