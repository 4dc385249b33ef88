"""What every rendered file shares: render options, where secrets live on a machine, and the
environment a node needs for the cluster's token auth and TLS.

Secrets are never written into rendered files. Files *refer* to them: the token and TLS files
live under ``/etc/hybridray/CLUSTER/`` on hosts (copied there by the operator), come from
``file_mounts`` on cloud nodes, and from Kubernetes Secrets in pods.
"""

from __future__ import annotations

import json
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
        image: container image for Kubernetes pods (default ``rayproject/ray:VERSION``).
    """

    head_address: str | None = None
    tls: bool = True
    secrets_dir: str = "./secrets"
    gcp_project: str | None = None
    ray_version: str = ""
    image: str | None = None

    def version(self) -> str:
        if self.ray_version:
            return self.ray_version
        from importlib.metadata import version

        return version("ray")

    def container_image(self) -> str:
        return self.image or f"rayproject/ray:{self.version()}"

    def gcs_address(self, default_host: str | None = None) -> str | None:
        host = self.head_address or default_host
        if host is None:
            return None
        return host if ":" in host else f"{host}:6379"


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
