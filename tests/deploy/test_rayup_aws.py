"""Issue 12 items 1-2: the rendered ``ray up`` file, read by Ray's own code.

Ray's config path (``prepare_config``, ``validate_config``, ``hash_runtime_conf``) and Ray's AWS
node provider run against a moto EC2 server (real HTTP, ``AWS_ENDPOINT_URL``): the on-prem
head's autoscaler, which runs no ``ray up`` bootstrap, launches a burst of the cloud site's
pools; the instances' types, subnets, security groups, key pair, image, tags and spot market are
read back from EC2, and the labels and resources each would start with are what Ray's updater
exports (``_with_environment_variables``) parsed by ``ray start``'s own reader
(``ResourceAndLabelSpec``). No Ray cluster is started.
"""

from __future__ import annotations

import copy
import json
import shlex
import socket
import subprocess
import sys

import pytest
import yaml

from hybridray import labels as L
from hybridray.deploy.common import RenderOptions
from hybridray.deploy.render import build, render
from hybridray.topology import load_topology
from tests.paths import CLUSTERS


@pytest.fixture(scope="module")
def ec2(tmp_path_factory):
    """A moto EC2 server on loopback with a VPC, subnet, security group and key pair."""
    from moto.server import ThreadedMotoServer

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    try:
        import boto3

        client = boto3.client("ec2", region_name="us-east-1")
        vpc = client.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
        subnet = client.create_subnet(VpcId=vpc, CidrBlock="10.30.1.0/24",
                                      AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
        sg = client.create_security_group(GroupName="hybridray", Description="hybridray",
                                          VpcId=vpc)["GroupId"]
        client.create_key_pair(KeyName="hybridray-ops")
        cpu_ami, gpu_ami = (i["ImageId"] for i in
                            client.describe_images(Owners=["amazon"])["Images"][:2])
        key = tmp_path_factory.mktemp("ssh") / "hybridray-ops.pem"  # Ray hashes it at launch
        key.write_text(client.create_key_pair(KeyName="hybridray-ops-2")["KeyMaterial"])
        yield {"client": client, "options": dict(
            aws_subnets=(subnet,), aws_security_groups=(sg,), ssh_key_name="hybridray-ops",
            ssh_private_key=str(key), aws_ami=cpu_ami, aws_gpu_ami=gpu_ami)}
    finally:
        mp.undo()
        server.stop()


def _launch(config: dict, node_type: str, count: int) -> list[str]:
    """What the autoscaler's NodeLauncher does for one node type, through Ray's provider."""
    from ray.autoscaler._private.providers import _get_node_provider
    from ray.autoscaler._private.util import hash_launch_conf
    from ray.autoscaler.tags import (
        NODE_KIND_WORKER,
        STATUS_UNINITIALIZED,
        TAG_RAY_LAUNCH_CONFIG,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_NAME,
        TAG_RAY_NODE_STATUS,
        TAG_RAY_USER_NODE_TYPE,
    )

    provider = _get_node_provider(config["provider"], config["cluster_name"], use_cache=False)
    node_type_config = config["available_node_types"][node_type]
    node_config = copy.deepcopy(node_type_config["node_config"])
    tags = {TAG_RAY_NODE_NAME: f"ray-{config['cluster_name']}-worker",
            TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_NODE_STATUS: STATUS_UNINITIALIZED,
            TAG_RAY_LAUNCH_CONFIG: hash_launch_conf(node_config, config["auth"]),
            TAG_RAY_USER_NODE_TYPE: node_type}
    created = provider.create_node_with_resources_and_labels(
        node_config, tags, count, node_type_config["resources"], node_type_config["labels"])
    return list(created)


def _started_with(config: dict, node_type: str) -> tuple[dict, dict]:
    """The labels and resources ``ray start`` reads on a node of ``node_type``: the updater's
    exported variables (Ray's own quoting), run by bash, read by Ray's ResourceAndLabelSpec."""
    from ray.autoscaler._private.command_runner import _with_environment_variables

    t = config["available_node_types"][node_type]
    code = ("import json; from ray._private.resource_and_label_spec import "
            "ResourceAndLabelSpec as R; print(json.dumps([R._load_env_labels(), "
            "R._load_env_resources()]))")
    cmd = _with_environment_variables(f"{sys.executable} -c {shlex.quote(code)}",
                                      {"RAY_OVERRIDE_RESOURCES": t["resources"],
                                       "RAY_OVERRIDE_LABELS": t["labels"]})
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels, resources = json.loads(proc.stdout.strip().splitlines()[-1])
    return labels, resources


def test_the_onprem_heads_autoscaler_launches_a_burst_through_rays_aws_provider(ec2):
    from ray.autoscaler._private.util import prepare_config, validate_config

    topology = load_topology(CLUSTERS / "onprem-aws.yaml")
    rendered = build(topology, RenderOptions(head_address="10.20.0.5", **ec2["options"]))
    raw = yaml.safe_load(rendered.files["aws/ray-up.yaml"])
    config = prepare_config(copy.deepcopy(raw))  # what the autoscaler does with the file
    validate_config(config)
    burst = {"h100": 2, "a10g-spot": 3, "cpu": 1}
    # one create_node call per instance: moto's RunInstances launches MinCount (Ray asks for
    # MinCount=1, MaxCount=n, and EC2 itself would launch up to n)
    launched = {t: [i for _ in range(n) for i in _launch(config, t, 1)]
                for t, n in burst.items()}
    client = ec2["client"]
    site = topology.sites["aws"]
    for pool in site.pools:
        ids = launched[pool.name]
        assert len(ids) == burst[pool.name]
        reservations = client.describe_instances(InstanceIds=ids)["Reservations"]
        instances = [i for r in reservations for i in r["Instances"]]
        for inst in instances:
            tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
            assert inst["InstanceType"] == pool.instance_type
            assert inst["SubnetId"] == ec2["options"]["aws_subnets"][0]
            assert [g["GroupId"] for g in inst["SecurityGroups"]] == \
                list(ec2["options"]["aws_security_groups"])
            assert inst["KeyName"] == "hybridray-ops"
            assert inst["ImageId"] == (ec2["options"]["aws_gpu_ami"] if pool.gpus
                                       else ec2["options"]["aws_ami"])
            assert (inst.get("InstanceLifecycle") == "spot") == pool.spot
            assert tags["ray-user-node-type"] == pool.name
            assert tags["ray-cluster-name"] == "onprem-aws-aws"
            assert tags["hybridray.io/site"] == "aws" and tags["hybridray.io/pool"] == pool.name
        labels, resources = _started_with(config, pool.name)
        expected = L.node_labels(topology, "aws", pool)
        assert labels == expected
        assert labels[L.MARKET_TYPE] == ("spot" if pool.spot else "on-demand")
        assert resources["site:aws"] == 1000 and resources["CPU"] == pool.cpus
        assert resources.get("GPU", 0) == pool.gpus
        assert resources["memory"] == int(pool.memory_gb * 2**30)


def test_todays_file_would_fail_in_rays_provider(ec2):
    """The finding, kept as a regression: without SubnetIds, Ray's provider raises KeyError,
    which is why render now refuses to write such a file."""
    topology = load_topology(CLUSTERS / "onprem-aws.yaml")
    options = dict(ec2["options"], aws_subnets=())
    from ray.autoscaler._private.util import prepare_config

    from hybridray.deploy import rayup

    cloud = rayup.Aws(topology, "aws", RenderOptions(**options))
    config = {"provider": cloud.provider(), "cluster_name": "x", "auth": {},
              "available_node_types": {"cpu": {"node_config": cloud.node_config(
                  topology.sites["aws"].pools[2], "p"), "resources": {}, "labels": {},
                  "min_workers": 0, "max_workers": 1}}, "head_node_type": "cpu"}
    with pytest.raises(KeyError, match="SubnetIds"):
        _launch(prepare_config(config), "cpu", 1)


def test_file_mounts_resolve_from_any_working_directory(tmp_path, monkeypatch):
    """Item 2: Ray hashes every file_mounts source on the machine that reads the file (the
    head's autoscaler under systemd runs in /). With the head at the cloud site, ray up runs
    on the operator's machine: the sources are the secrets and render directories, absolute."""
    from ray.autoscaler._private.util import hash_runtime_conf, prepare_config

    from hybridray.deploy.secrets import make_secrets

    topology = load_topology(CLUSTERS / "onprem-aws.yaml", ["head.site=aws"])
    secrets = tmp_path / "secrets"
    make_secrets(topology, secrets, host_ips={h: "10.20.0.9" for p in topology.sites[
        "onprem"].pools for h in p.hosts})
    monkeypatch.chdir(tmp_path)
    render(topology, "out", RenderOptions(secrets_dir="secrets"))  # relative on purpose
    config = prepare_config(yaml.safe_load((tmp_path / "out" / "aws" / "ray-up.yaml")
                                           .read_text()))
    monkeypatch.chdir("/")
    assert all(src.startswith(str(tmp_path)) for src in config["file_mounts"].values())
    hash_runtime_conf(config["file_mounts"], config["cluster_synced_files"],
                      [config["worker_setup_commands"], config["worker_start_ray_commands"]],
                      generate_file_mounts_contents_hash=True)
    assert config["file_mounts"]["~/hybridray/onprem-aws/tls/site-ca.key"] == \
        str(secrets / "sites" / "aws" / "ca.key")  # the site's CA, never the root key


def test_start_commands_are_valid_shell_that_run_ray_start(tmp_path):
    """The worker start command as Ray's updater runs it: RAY_HEAD_IP exported first."""
    topology = load_topology(CLUSTERS / "onprem-aws.yaml")
    from tests.deploy.conftest import AWS_OPTIONS

    raw = yaml.safe_load(build(topology, RenderOptions(**AWS_OPTIONS)).files["aws/ray-up.yaml"])
    fake = tmp_path / "ray"
    fake.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n')
    fake.chmod(0o755)
    cmd = "export RAY_HEAD_IP=10.20.0.5; " + raw["worker_start_ray_commands"][-1]
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path),
           "CALLS": str(tmp_path / "calls")}
    proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "calls").read_text().split()
    assert args[:2] == ["start", "--address=10.20.0.5:6379"] and "--node-manager-port" in args
    assert raw["auth"] == {"ssh_user": "ubuntu",
                           "ssh_private_key": AWS_OPTIONS["ssh_private_key"]}
    assert raw["worker_setup_commands"][0].startswith("DELETE_SITE_KEY=1 sh ")
