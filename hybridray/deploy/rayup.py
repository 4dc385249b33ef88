"""The ``ray up`` cluster-launcher file for a site whose VMs Ray's autoscaler creates.

One class per provider, registered by name: each knows its own ``provider:`` block and how
a pool becomes a ``node_config`` (instance type, spot market, accelerators). Everything else
(labels, resources, min/max workers, the start commands with token auth and TLS) is shared.

Where the head runs decides how the file is used:

* head at this site: ``ray up ray-up.yaml`` launches the head here and scales the pools;
* head elsewhere (an on-prem machine): the head runs ``ray start --head
  --autoscaling-config ray-up.yaml`` and its autoscaler launches this site's pools, which
  join it over the private link. The ``head`` node type then stands for that machine and is
  never launched (``max_workers: 0``). No ``ray up`` bootstrap runs in that case, so every
  ``node_config`` must already hold what Ray's AWS provider reads (``SubnetIds``,
  ``SecurityGroupIds``, ``KeyName``, ``ImageId``) and ``auth`` the SSH key the autoscaler
  uses: render refuses without them.

``file_mounts`` sources are absolute (the autoscaler resolves them from its working directory,
``/`` under systemd). A VM receives the cluster token, the trust bundle and *its own site's*
intermediate CA (to mint its certificate at boot, after which the key is deleted), never the
root CA's key (docs/security.md#trust-per-site).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from hybridray.deploy import network
from hybridray.deploy.common import (
    RenderOptions,
    declared_args,
    etc_dir,
    head_node,
    int_resources,
    node_env,
    pool_node,
)
from hybridray.exceptions import DeployError
from hybridray.topology.models import NodePool, Site, Topology

HEAD_TYPE = "head"
NODE_CERT_SCRIPT = "node-cert.sh"


class CloudProvider:
    """A VM provider Ray's cluster launcher supports."""

    name: ClassVar[str]
    default_head_instance: ClassVar[str]

    def __init__(self, topology: Topology, site_name: str, options: RenderOptions):
        self.topology = topology
        self.site_name = site_name
        self.site: Site = topology.sites[site_name]
        self.options = options

    def provider(self) -> dict[str, Any]:
        raise NotImplementedError

    def node_config(self, pool: NodePool | None, where: str) -> dict[str, Any]:
        raise NotImplementedError

    def check_unbootstrapped(self) -> None:
        """Refuse what the provider cannot launch without ``ray up``'s bootstrap."""

    def _instance_type(self, pool: NodePool | None, where: str) -> str:
        if pool is None:
            return self.default_head_instance
        if not pool.instance_type:
            raise DeployError(f"{where}.instance_type: every {self.name} pool needs an instance "
                              f"type for ray up; set it (e.g. instance_type: "
                              f"{self.default_head_instance})")
        return pool.instance_type


class Aws(CloudProvider):
    name = "aws"
    default_head_instance = "m7i.2xlarge"

    def provider(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "aws", "region": self.site.region,
                               "use_internal_ips": True, "cache_stopped_nodes": False}
        if self.site.zone:
            out["availability_zone"] = self.site.zone
        return out

    def node_config(self, pool, where):
        o = self.options
        config: dict[str, Any] = {"InstanceType": self._instance_type(pool, where)}
        image = o.aws_gpu_ami if pool is not None and pool.gpus else o.aws_ami
        if image:
            config["ImageId"] = image
        if o.aws_subnets:
            config["SubnetIds"] = list(o.aws_subnets)
        if o.aws_security_groups:
            config["SecurityGroupIds"] = list(o.aws_security_groups)
        if o.ssh_key_name:
            config["KeyName"] = o.ssh_key_name
        if pool is not None and pool.spot:
            config["InstanceMarketOptions"] = {"MarketType": "spot"}
        tags = [{"Key": "hybridray.io/cluster", "Value": self.topology.name},
                {"Key": "hybridray.io/site", "Value": self.site_name}]
        if pool is not None:
            tags.append({"Key": "hybridray.io/pool", "Value": pool.name})
        config["TagSpecifications"] = [{"ResourceType": "instance", "Tags": tags}]
        return config

    def check_unbootstrapped(self) -> None:
        """The head runs elsewhere: no ray up bootstrap will fill in the node configs."""
        o = self.options
        gpu = any(p.gpus for p in self.site.pools)
        missing = [flag for flag, value in (
            ("--aws-subnet SUBNET_ID", o.aws_subnets),
            ("--aws-security-group SG_ID", o.aws_security_groups),
            ("--ssh-key-name KEY_PAIR", o.ssh_key_name),
            ("--ssh-private-key PATH_ON_THE_HEAD", o.ssh_private_key),
            ("--aws-ami AMI_ID", o.aws_ami or not any(not p.gpus for p in self.site.pools)),
            ("--aws-gpu-ami AMI_ID", o.aws_gpu_ami or not gpu)) if not value]
        if missing:
            raise DeployError(
                f"sites.{self.site_name}: the head runs at {self.topology.head.site!r}, whose "
                f"autoscaler launches the {self.site_name} VMs without ray up's bootstrap, so "
                f"every node type must name its subnets, security groups, key pair and image; "
                f"pass {' '.join(missing)}")


GCP_ACCELERATORS = {"A100": "nvidia-tesla-a100", "A100-80GB": "nvidia-a100-80gb",
                    "H100": "nvidia-h100-80gb", "L4": "nvidia-l4", "T4": "nvidia-tesla-t4",
                    "V100": "nvidia-tesla-v100"}


class Gcp(CloudProvider):
    name = "gcp"
    default_head_instance = "n2-standard-8"

    def provider(self) -> dict[str, Any]:
        if not self.options.gcp_project:
            raise DeployError(f"sites.{self.site_name}: provider gcp needs a GCP project id, "
                              "which cluster files do not hold; pass --gcp-project PROJECT")
        return {"type": "gcp", "region": self.site.region,
                "availability_zone": self.site.zone or f"{self.site.region}-a",
                "project_id": self.options.gcp_project, "use_internal_ips": True}

    def node_config(self, pool, where):
        config: dict[str, Any] = {
            "machineType": self._instance_type(pool, where),
            "disks": [{"boot": True, "autoDelete": True, "type": "PERSISTENT",
                       "initializeParams": {"diskSizeGb": 200, "sourceImage":
                                            "projects/deeplearning-platform-release/global/"
                                            "images/family/common-cpu"}}]}
        if pool is not None and pool.gpus:
            acc = GCP_ACCELERATORS.get(pool.accelerator or "")
            if acc is None:
                raise DeployError(
                    f"{where}.accelerator: no GCP accelerator type known for "
                    f"{pool.accelerator!r}; use one of {', '.join(GCP_ACCELERATORS)}")
            config["guestAccelerators"] = [{"acceleratorType": acc,
                                            "acceleratorCount": pool.gpus}]
            config["scheduling"] = [{"onHostMaintenance": "TERMINATE"}]
        if pool is not None and pool.spot:
            config.setdefault("scheduling", []).append({"preemptible": True})
        return config


    def check_unbootstrapped(self) -> None:
        # Ray's GCP provider needs networkInterfaces and serviceAccounts that only ray up's
        # bootstrap (gcp/config.py) fills in; hybridray does not render them.
        raise DeployError(
            f"sites.{self.site_name}: the head runs at {self.topology.head.site!r}, whose "
            f"autoscaler would launch the gcp VMs without ray up's bootstrap, which Ray's GCP "
            "provider needs; put the head at this site (head.site), or run the site on GKE "
            "(provider: kubernetes)")


PROVIDERS: dict[str, type[CloudProvider]] = {"aws": Aws, "gcp": Gcp}


def ray_up_config(topology: Topology, site_name: str, options: RenderOptions) -> dict[str, Any]:
    """The cluster-launcher config (a dict ready for YAML) for cloud site ``site_name``."""
    site = topology.sites[site_name]
    cls = PROVIDERS.get(site.provider.value)
    if cls is None:
        raise DeployError(f"sites.{site_name}.provider: hybridray render cannot produce "
                          f"{site.provider.value} files yet (it renders aws and gcp for "
                          "ray up, static hosts and kubernetes); write that site's node "
                          "types by hand (docs/deploy.md), or run it on Kubernetes")
    cloud = cls(topology, site_name, options)
    provider = cloud.provider()  # a missing project or region is said first
    head_here = topology.head.site == site_name
    head = head_node(topology)
    types: dict[str, Any] = {HEAD_TYPE: {
        "node_config": cloud.node_config(None, "head") if head_here else {},
        "resources": {"CPU": head.cpus, **int_resources(head, "head")},
        "labels": head.labels,
        "min_workers": 0, "max_workers": 0}}
    max_workers = 0
    for p, pool in enumerate(site.pools):
        where = f"sites.{site_name}.pools[{p}]"
        if pool.name == HEAD_TYPE:
            raise DeployError(f"{where}.name: 'head' is the ray up file's head node type; "
                              "rename the pool")
        spec = pool_node(topology, site_name, pool)
        labels = {k: v for k, v in spec.labels.items() if k != "hybridray.io/node"}
        resources = {"CPU": spec.cpus, **({"GPU": spec.gpus} if spec.gpus else {}),
                     "memory": spec.memory_bytes, "object_store_memory": spec.object_store_bytes,
                     **int_resources(spec, where)}
        types[pool.name] = {"node_config": cloud.node_config(pool, where),
                            "resources": resources, "labels": labels,
                            "min_workers": pool.min_nodes, "max_workers": pool.max_nodes}
        if pool.elastic:  # the pool's own idle timeout (autoscaler v2 reads it per type)
            types[pool.name]["idle_timeout_s"] = pool.idle_timeout
        max_workers += pool.max_nodes
    if not head_here:
        cloud.check_unbootstrapped()
    # ray up copies file_mounts as the SSH user, so on VMs the files live in its home, not
    # under /etc/hybridray as on hosts; the start commands run in a shell that expands $HOME.
    mount_dir = f"~/hybridray/{topology.name}"
    home_dir = f"$HOME/hybridray/{topology.name}"
    sources = mount_sources(topology, site_name, options)
    mounts = {f"{mount_dir}/token": sources["token"]}
    if options.tls:
        mounts[f"{mount_dir}/tls/ca.crt"] = sources["trust"]
        mounts[f"{mount_dir}/tls/site-ca.crt"] = sources["site_ca"]
        mounts[f"{mount_dir}/tls/site-ca.key"] = sources["site_key"]
        mounts[f"{mount_dir}/{NODE_CERT_SCRIPT}"] = sources["script"]
    etc = str(etc_dir(topology))
    exports = " ".join(f"{k}={v.replace(etc, home_dir)}"
                       for k, v in node_env(topology, options).items())
    setup = [f"pip install -q 'ray[default]=={options.version()}'",
             f"chmod 700 {home_dir} && chmod 600 {home_dir}/token"]
    head_setup: list[str] = []
    worker_setup: list[str] = []
    if options.tls:  # mint with the site CA, then delete its key from the VM
        mint = (f"DELETE_SITE_KEY=1 sh {home_dir}/{NODE_CERT_SCRIPT} {home_dir}/tls "
                f"{home_dir}/tls")
        head_host = (options.head_address or "").rsplit(":", 1)[0].strip("[]")
        head_setup.append(f"{mint} {head_host}".strip() if head_here else mint)
        worker_setup.append(mint)
    worker_args = " ".join(network.ray_start_port_args(head=False))
    head_args = " ".join(a if " " not in a else repr(a) for a in
                         ["--head", *network.ray_start_port_args(head=True),
                          "--autoscaling-config=~/ray_bootstrap_config.yaml"])
    return {
        "cluster_name": f"{topology.name}-{site_name}",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": provider,
        "auth": {"ssh_user": "ubuntu",
                 **({"ssh_private_key": options.ssh_private_key}
                    if options.ssh_private_key else {})},
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "file_mounts": mounts,
        "setup_commands": setup,
        "head_setup_commands": head_setup,
        "worker_setup_commands": worker_setup,
        "head_start_ray_commands": ["ray stop",
                                    f"ulimit -n 65536; {exports} ray start {head_args} "
                                    f"{' '.join(_quoted(declared_args(head)))}"],
        "worker_start_ray_commands": ["ray stop",
                                      f"ulimit -n 65536; {exports} ray start "
                                      f"--address=$RAY_HEAD_IP:{network.GCS} {worker_args}"],
    }


def mount_sources(topology: Topology, site_name: str, options: RenderOptions) -> dict[str, str]:
    """Absolute paths, on the machine whose autoscaler reads the file, of what VMs receive.

    Head at this site: ``ray up`` runs on the operator's machine, from ``--secrets-dir`` and
    the render directory. Head elsewhere: the head's own autoscaler syncs them from the head,
    where README.md tells the operator to put them (under ``/etc/hybridray/CLUSTER``).
    """
    if topology.head.site == site_name:
        secrets = os.path.abspath(os.path.expanduser(options.secrets_dir))
        deploy = os.path.abspath(options.deploy_dir or ".")
        return {"token": f"{secrets}/token", "trust": f"{secrets}/trust.pem",
                "site_ca": f"{secrets}/sites/{site_name}/ca.crt",
                "site_key": f"{secrets}/sites/{site_name}/ca.key",
                "script": f"{deploy}/{site_name}/{NODE_CERT_SCRIPT}"}
    etc = str(etc_dir(topology))
    return {"token": f"{etc}/token", "trust": f"{etc}/tls/ca.crt",
            "site_ca": f"{etc}/sites/{site_name}/ca.crt",
            "site_key": f"{etc}/sites/{site_name}/ca.key",
            "script": f"{etc}/{site_name}/{NODE_CERT_SCRIPT}"}


def _quoted(args: list[str]) -> list[str]:
    import shlex

    return [shlex.quote(a) for a in args]


def validate_ray_up(config: dict[str, Any]) -> None:
    """Check ``config`` with Ray's own cluster-launcher validation (its shipped schema plus
    the cross-field checks ``ray up`` runs), so a file that ``ray up`` would refuse is never
    written."""
    import contextlib
    import copy
    import io
    import json
    import os

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(schema_path) as f:
        schema = json.load(f)
    try:
        jsonschema.validate(config, schema)                  # the file as written
        # as ray up reads it (its printed advice on file mounts is noise here)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # jsonschema's ValidationError, Ray's ValueError/RuntimeError
        raise DeployError(f"the rendered ray up file for {config.get('cluster_name')!r} does "
                          f"not pass Ray's schema: {str(e).splitlines()[0]}; this is a "
                          "hybridray bug, please report it with the cluster file") from None
