"""A KubeRay ``RayCluster`` per Kubernetes site: one worker group per node pool.

Written against what the KubeRay v1.7.0 operator does with the manifest (each rule is a test in
``tests/deploy/test_kuberay_rules.py`` citing the operator's source file):

* **Resources in one place.** CPUs, GPUs, memory and the site's custom resources go in the
  group's ``resources`` field only; the operator turns them into ``ray start`` flags and
  rejects a group that also sets ``num-cpus``/``num-gpus``/``memory``/``resources`` in
  ``rayStartParams`` (``utils/validation.go: validateRayGroupResources``). Labels go in the
  group's ``labels`` field (``validateRayGroupLabels``), never ``rayStartParams['labels']``.
* **Token auth through ``authOptions``** (``mode: token``, ``secretName``), so the operator
  puts ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` (Secret key ``auth_token``) into the Ray
  container, the autoscaler sidecar and the ``wait-gcs-ready`` init container
  (``common/pod.go: SetContainerTokenAuthEnvVars``).
* **TLS with the site's own CA**, not ``tlsOptions`` (that needs the ``RayClusterMTLS``
  feature gate and cert-manager, and its certificates would not chain to the cluster's other
  sites). An init container mints the pod's certificate with the site's intermediate CA from
  the ``CLUSTER-SITE-ray-ca`` Secret (mounted only there), for the pod IP, its host name and,
  on head pods, the head Service's names and ``--head-address``. The TLS variables and the
  certificate volume also go to the autoscaler sidecar (``autoscalerOptions.env`` /
  ``volumeMounts``: the operator copies nothing into it without ``tlsOptions``).
* **Every port pinned** in ``rayStartParams`` (the operator otherwise picks 8080 for metrics,
  ``setMissingRayStartParams``), so the README's firewall table is what runs.
* **Autoscaling with v2 everywhere.** The head's site runs KubeRay's in-tree autoscaler. A
  Kubernetes site whose workers join a head elsewhere still needs a head group (a stand-in
  with 0 CPUs that runs no work); its autoscaler sidecar is pointed at the real head's GCS
  (``ray kuberay-autoscaler --gcs-address``), so the cluster's demand for that site's labels
  scales that site's groups.
* GPU groups use Ray's ``-gpu`` image.
"""

from __future__ import annotations

import re
from typing import Any

from hybridray.deploy import network
from hybridray.deploy.common import (
    RenderOptions,
    head_node,
    int_resources,
    pool_node,
)
from hybridray.deploy.mint import NODE_CERT_SH
from hybridray.exceptions import DeployError
from hybridray.topology.models import Topology

TLS_MOUNT = "/etc/ray/tls"
CA_MOUNT = "/etc/ray/site-ca"
TLS_VOLUME = "hybridray-tls"
CA_VOLUME = "hybridray-site-ca"
AUTH_TOKEN_KEY = "auth_token"  # KubeRay's RAY_AUTH_TOKEN_SECRET_KEY (utils/constant.go)
CLUSTER_DOMAIN = "cluster.local"
MAX_NAME = 53  # utils/constant.go MaxRayClusterNameLength; the name is also a DNS-1035 label


def names(topology: Topology, site: str | None = None) -> dict[str, str]:
    """The Kubernetes object names the manifests refer to."""
    out = {"token_secret": f"{topology.name}-ray-token",
           "head_configmap": f"{topology.name}-head"}
    if site is not None:
        out["ca_secret"] = f"{topology.name}-{site}-ray-ca"
        out["raycluster"] = f"{topology.name}-{site}"
    return out


def head_service_names(topology: Topology, site: str) -> list[str]:
    """The head Service's names (KubeRay: ``NAME-head-svc``, ``utils/util.go:
    GenerateHeadServiceName`` / ``GenerateFQDNServiceName``)."""
    ns = topology.sites[site].namespace
    svc = f"{names(topology, site)['raycluster']}-head-svc"
    return [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.{CLUSTER_DOMAIN}"]


def _ports(head: bool) -> dict[str, str]:
    args = network.ray_start_port_args(head=head)
    params = {args[i].lstrip("-"): args[i + 1] for i in range(0, len(args), 2)}
    params.pop("dashboard-host", None)
    if head:
        params["dashboard-host"] = "0.0.0.0"
    return params


def raycluster(topology: Topology, site_name: str, options: RenderOptions) -> dict[str, Any]:
    """The ``RayCluster`` manifest (a dict ready for YAML) of kubernetes site ``site_name``."""
    site = topology.sites[site_name]
    if not site.namespace:
        raise DeployError(f"sites.{site_name}.namespace: a kubernetes site needs the namespace "
                          "its RayCluster lives in; set it (e.g. namespace: ray)")
    n = names(topology, site_name)
    if len(n["raycluster"]) > MAX_NAME or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?",
                                                            n["raycluster"]):
        raise DeployError(f"sites.{site_name}: the RayCluster name {n['raycluster']!r} (cluster "
                          f"name, '-', site name) must be at most {MAX_NAME} characters and "
                          "start with a letter (KubeRay's rule); shorten or rename the cluster "
                          "or the site")
    head_here = topology.head.site == site_name
    head = head_node(topology)
    address = None if head_here else (options.gcs_address() or "${HYBRIDRAY_HEAD_ADDRESS}")
    head_params = {"object-store-memory": str(head.object_store_bytes), **_ports(head=True)}
    head_labels = head.labels
    head_resources = {"CPU": str(head.cpus), **_str_resources(head, "head")}
    if not head_here:  # KubeRay requires a head; this one is a stand-in that runs nothing
        head_params = {"num-cpus": "0", "num-gpus": "0", "include-dashboard": "false",
                       **_ports(head=True)}
        head_labels = {"hybridray.io/role": "standin-head",
                       "hybridray.io/cluster": topology.name}
        head_resources = {}
    head_sans = head_service_names(topology, site_name)
    if head_here and options.head_address:
        host = options.head_address
        head_sans.append(host[1:].partition("]")[0] if host.startswith("[")
                         else host.rsplit(":", 1)[0] if host.count(":") == 1 else host)
    spec: dict[str, Any] = {
        "rayVersion": options.version(),
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": _autoscaler(topology, site_name, options, address),
        "authOptions": {"mode": "token", "secretName": n["token_secret"]},
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": head_params,
            "labels": head_labels,
            "resources": head_resources,
            "template": _pod("ray-head", topology, site_name, options, cpu="2",
                             memory="8Gi", gpus=0, node_selector={}, sans=head_sans,
                             head_from_configmap=False),
        },
        "workerGroupSpecs": [],
    }
    for p, pool in enumerate(site.pools):
        where = f"sites.{site_name}.pools[{p}]"
        node = pool_node(topology, site_name, pool)
        params = {"object-store-memory": str(node.object_store_bytes), **_ports(head=False)}
        if address:
            params["address"] = address
        labels = {k: v for k, v in node.labels.items() if k != "hybridray.io/node"}
        resources = {"CPU": str(node.cpus), **({"GPU": str(node.gpus)} if node.gpus else {}),
                     "memory": str(node.memory_bytes), **_str_resources(node, where)}
        # autoscaler v2 reads the idle timeout per group (KubeRay's idleTimeoutSeconds)
        idle = {"idleTimeoutSeconds": int(pool.idle_timeout)} if pool.elastic else {}
        spec["workerGroupSpecs"].append({
            "groupName": pool.name,
            "replicas": pool.min_nodes,
            "minReplicas": pool.min_nodes,
            "maxReplicas": pool.max_nodes,
            **idle,
            "rayStartParams": params,
            "labels": labels,
            "resources": resources,
            "template": _pod("ray-worker", topology, site_name, options, cpu=_cpu(pool.cpus),
                             memory=f"{int(pool.memory_gb * 1024)}Mi", gpus=pool.gpus,
                             node_selector=dict(pool.node_selector), sans=[],
                             head_from_configmap=address == "${HYBRIDRAY_HEAD_ADDRESS}"),
        })
    meta = {"name": n["raycluster"], "namespace": site.namespace,
            "labels": {"hybridray.io/cluster": topology.name, "hybridray.io/site": site_name}}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": meta, "spec": spec}


def _autoscaler(topology: Topology, site_name: str, options: RenderOptions,
                address: str | None) -> dict[str, Any]:
    """v2, with the TLS settings and, away from the head, the real head's GCS address."""
    env: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if options.tls:
        env += _tls_env()
        mounts.append({"name": TLS_VOLUME, "mountPath": TLS_MOUNT, "readOnly": True})
    out: dict[str, Any] = {"version": "v2", "upscalingMode": "Default", "env": env,
                           "volumeMounts": mounts}
    if address is not None:  # a site without the head: scale for the real head's demand
        if address == "${HYBRIDRAY_HEAD_ADDRESS}":
            env.append(_head_from_configmap(topology))
        out["args"] = [f"$KUBERAY_GEN_AUTOSCALER_START_CMD --gcs-address {address}"]
    return out


def _head_from_configmap(topology: Topology) -> dict[str, Any]:
    return {"name": "HYBRIDRAY_HEAD_ADDRESS", "valueFrom": {"configMapKeyRef": {
        "name": names(topology)["head_configmap"], "key": "address"}}}


def _tls_env() -> list[dict[str, str]]:
    return [{"name": "RAY_USE_TLS", "value": "1"},
            {"name": "RAY_TLS_SERVER_CERT", "value": f"{TLS_MOUNT}/node.crt"},
            {"name": "RAY_TLS_SERVER_KEY", "value": f"{TLS_MOUNT}/node.key"},
            {"name": "RAY_TLS_CA_CERT", "value": f"{TLS_MOUNT}/ca.crt"}]


def _str_resources(spec, where: str) -> dict[str, str]:
    return {k: str(v) for k, v in int_resources(spec, where).items()}


def _cpu(cpus: float) -> str:
    return str(int(cpus)) if cpus == int(cpus) else f"{int(cpus * 1000)}m"


def _pod(container: str, topology: Topology, site: str, options: RenderOptions, *, cpu: str,
         memory: str, gpus: int, node_selector: dict[str, str], sans: list[str],
         head_from_configmap: bool) -> dict[str, Any]:
    n = names(topology, site)
    limits: dict[str, str] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    env: list[dict[str, Any]] = [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}]
    if head_from_configmap:
        env.append(_head_from_configmap(topology))
    image = options.container_image(gpus)
    ray: dict[str, Any] = {
        "name": container, "image": image,
        "resources": {"requests": dict(limits), "limits": limits},
        "env": env,
        "ports": [{"containerPort": network.GCS, "name": "gcs"},
                  {"containerPort": network.DASHBOARD, "name": "dashboard"},
                  {"containerPort": network.METRICS_EXPORT, "name": "metrics"}]
        if container == "ray-head" else
        [{"containerPort": network.METRICS_EXPORT, "name": "metrics"}],
    }
    pod_spec: dict[str, Any] = {"containers": [ray]}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if options.tls:
        env += _tls_env()
        ray["volumeMounts"] = [{"name": TLS_VOLUME, "mountPath": TLS_MOUNT, "readOnly": True}]
        pod_spec["initContainers"] = [{
            "name": "hybridray-node-cert", "image": image,
            "command": ["/bin/sh", "-c", NODE_CERT_SH, "node-cert.sh", CA_MOUNT, TLS_MOUNT,
                        *sans],
            "env": [{"name": "NODE_IP", "valueFrom": {"fieldRef": {
                "fieldPath": "status.podIP"}}}],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                          "limits": {"cpu": "200m", "memory": "128Mi"}},
            "volumeMounts": [{"name": TLS_VOLUME, "mountPath": TLS_MOUNT},
                             {"name": CA_VOLUME, "mountPath": CA_MOUNT, "readOnly": True}]}]
        pod_spec["volumes"] = [
            {"name": TLS_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            # readable by the image's non-root user; mounted only into the init container
            {"name": CA_VOLUME, "secret": {"secretName": n["ca_secret"], "defaultMode": 0o444}}]
    return {"metadata": {"labels": {"hybridray.io/cluster": topology.name}}, "spec": pod_spec}
