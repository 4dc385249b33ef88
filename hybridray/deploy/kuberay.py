"""A KubeRay ``RayCluster`` per Kubernetes site: one worker group per node pool.

Ray node labels and custom resources go into the group's ``labels``/``resources`` fields
(KubeRay passes them to ``ray start``), CPUs, GPUs and memory into ``rayStartParams`` and
the container's requests and limits, and the pool's ``node_selector`` into the pod's
``nodeSelector``. Token and TLS material come from Kubernetes Secrets, never from the
manifest: the token as ``RAY_AUTH_TOKEN`` from a Secret, the CA for the init container that
mints this pod's own certificate for its pod IP (Ray's TLS checks the address it dials).

The site that hosts the cluster's head gets the head group and KubeRay's autoscaler. Any
other Kubernetes site's workers join that head (``rayStartParams.address``); KubeRay still
requires a head group per ``RayCluster``, so that site's head pod is a small stand-in with
0 CPUs that runs no work (docs/deploy.md).
"""

from __future__ import annotations

from typing import Any

from hybridray.deploy import network
from hybridray.deploy.common import (
    RenderOptions,
    head_node,
    int_resources,
    pool_node,
)
from hybridray.exceptions import DeployError
from hybridray.topology.models import Topology

TLS_MOUNT = "/etc/ray/tls"
CERT_SCRIPT = r"""set -eu
apk add --no-cache openssl >/dev/null 2>&1 || true
cd /etc/ray/tls
openssl req -newkey rsa:2048 -nodes -keyout node.key -subj "/CN=$POD_IP" -out node.csr
printf "subjectAltName=IP:%s,IP:127.0.0.1,DNS:localhost,DNS:%s\n" "$POD_IP" "$(hostname)" > san.ext
openssl x509 -req -in node.csr -CA /etc/ray/ca/ca.crt -CAkey /etc/ray/ca/ca.key \
  -CAcreateserial -days 365 -extfile san.ext -out node.crt
cp /etc/ray/ca/ca.crt ca.crt
chmod 600 node.key
"""


def names(topology: Topology) -> dict[str, str]:
    """The Kubernetes object names the manifests refer to."""
    return {"token_secret": f"{topology.name}-ray-token",
            "ca_secret": f"{topology.name}-ray-ca",
            "head_configmap": f"{topology.name}-head"}


def raycluster(topology: Topology, site_name: str, options: RenderOptions) -> dict[str, Any]:
    """The ``RayCluster`` manifest (a dict ready for YAML) of kubernetes site ``site_name``."""
    site = topology.sites[site_name]
    if not site.namespace:
        raise DeployError(f"sites.{site_name}.namespace: a kubernetes site needs the namespace "
                          "its RayCluster lives in; set it (e.g. namespace: ray)")
    head_here = topology.head.site == site_name
    head = head_node(topology)
    head_params = {"num-cpus": str(head.cpus), "num-gpus": "0",
                   "object-store-memory": str(head.object_store_bytes),
                   "dashboard-host": "0.0.0.0", "port": str(network.GCS)}
    head_labels, head_resources = head.labels, _str_resources(head, "head")
    if not head_here:  # KubeRay requires a head; this one is a stand-in that runs nothing
        head_params = {"num-cpus": "0", "num-gpus": "0", "include-dashboard": "false"}
        head_labels = {"hybridray.io/role": "standin-head",
                       "hybridray.io/cluster": topology.name}
        head_resources = {}
    spec: dict[str, Any] = {
        "rayVersion": options.version(),
        "enableInTreeAutoscaling": head_here,
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": head_params,
            "labels": head_labels,
            "resources": head_resources,
            "template": _pod("ray-head", topology, options, cpu="2", memory="8Gi",
                             gpus=0, node_selector={}),
        },
        "workerGroupSpecs": [],
    }
    address = None
    if not head_here:
        address = options.gcs_address() or "${HYBRIDRAY_HEAD_ADDRESS}"
    for p, pool in enumerate(site.pools):
        where = f"sites.{site_name}.pools[{p}]"
        node = pool_node(topology, site_name, pool)
        params = {"num-cpus": str(node.cpus), "num-gpus": str(node.gpus),
                  "memory": str(node.memory_bytes),
                  "object-store-memory": str(node.object_store_bytes)}
        if address:
            params["address"] = address
        labels = {k: v for k, v in node.labels.items() if k != "hybridray.io/node"}
        spec["workerGroupSpecs"].append({
            "groupName": pool.name,
            "replicas": pool.min_nodes,
            "minReplicas": pool.min_nodes,
            "maxReplicas": pool.max_nodes,
            "rayStartParams": params,
            "labels": labels,
            "resources": _str_resources(node, where),
            "template": _pod("ray-worker", topology, options, cpu=_cpu(pool.cpus),
                             memory=f"{int(pool.memory_gb * 1024)}Mi", gpus=pool.gpus,
                             node_selector=dict(pool.node_selector),
                             head_from_configmap=address == "${HYBRIDRAY_HEAD_ADDRESS}"),
        })
    meta = {"name": f"{topology.name}-{site_name}", "namespace": site.namespace,
            "labels": {"hybridray.io/cluster": topology.name, "hybridray.io/site": site_name}}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": meta, "spec": spec}


def _str_resources(spec, where: str) -> dict[str, str]:
    return {k: str(v) for k, v in int_resources(spec, where).items()}


def _cpu(cpus: float) -> str:
    return str(int(cpus)) if cpus == int(cpus) else f"{int(cpus * 1000)}m"


def _pod(container: str, topology: Topology, options: RenderOptions, *, cpu: str, memory: str,
         gpus: int, node_selector: dict[str, str],
         head_from_configmap: bool = False) -> dict[str, Any]:
    n = names(topology)
    limits: dict[str, str] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    env: list[dict[str, Any]] = [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": n["token_secret"], "key": "token"}}},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
    ]
    if head_from_configmap:
        env.append({"name": "HYBRIDRAY_HEAD_ADDRESS", "valueFrom": {"configMapKeyRef": {
            "name": n["head_configmap"], "key": "address"}}})
    pod_spec: dict[str, Any] = {"containers": [{
        "name": container, "image": options.container_image(),
        "resources": {"requests": dict(limits), "limits": limits},
        "env": env,
        "ports": [{"containerPort": network.GCS, "name": "gcs"},
                  {"containerPort": network.DASHBOARD, "name": "dashboard"}]
        if container == "ray-head" else [],
    }]}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if options.tls:
        env += [{"name": "RAY_USE_TLS", "value": "1"},
                {"name": "RAY_TLS_SERVER_CERT", "value": f"{TLS_MOUNT}/node.crt"},
                {"name": "RAY_TLS_SERVER_KEY", "value": f"{TLS_MOUNT}/node.key"},
                {"name": "RAY_TLS_CA_CERT", "value": f"{TLS_MOUNT}/ca.crt"}]
        pod_spec["containers"][0]["volumeMounts"] = [{"name": "tls", "mountPath": TLS_MOUNT}]
        pod_spec["initContainers"] = [{
            "name": "node-cert", "image": options.container_image(),
            "command": ["/bin/sh", "-c", CERT_SCRIPT],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {
                "fieldPath": "status.podIP"}}}],
            "volumeMounts": [{"name": "tls", "mountPath": TLS_MOUNT},
                             {"name": "ca", "mountPath": "/etc/ray/ca", "readOnly": True}]}]
        pod_spec["volumes"] = [{"name": "tls", "emptyDir": {"medium": "Memory"}},
                               {"name": "ca", "secret": {"secretName": n["ca_secret"],
                                                         "defaultMode": 0o400}}]
    return {"metadata": {"labels": {"hybridray.io/cluster": topology.name}}, "spec": pod_spec}
