"""Schemas the rendered files are checked against, and a helper to render into tmp dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

KUBERAY_CRD = Path(os.environ.get("HYBRIDRAY_KUBERAY_CRD",
                                  "/work/shared/schemas/kuberay-v1.7.0-ray.io_rayclusters.yaml"))


@pytest.fixture(scope="session")
def ray_schema() -> dict:
    """Ray's cluster-launcher schema, from the installed ray package."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(scope="session")
def raycluster_schema() -> dict:
    """The openAPIV3Schema of the RayCluster version KubeRay v1.7.0 stores."""
    if not KUBERAY_CRD.is_file():
        pytest.skip(f"KubeRay CRD not found at {KUBERAY_CRD} (set HYBRIDRAY_KUBERAY_CRD)")
    crd = yaml.safe_load(KUBERAY_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return version["schema"]["openAPIV3Schema"]


# What an operator passes when the head is on-prem and its autoscaler launches AWS VMs
# without ray up's bootstrap (docs/deploy.md): shared by the render tests.
AWS_OPTIONS = dict(aws_subnets=("subnet-0a1b2c3d4e5f60718",),
                   aws_security_groups=("sg-0a1b2c3d4e5f60718",), ssh_key_name="hybridray-ops",
                   ssh_private_key="/etc/hybridray/onprem-aws/ssh/hybridray-ops.pem",
                   aws_ami="ami-0a1b2c3d4e5f60718", aws_gpu_ami="ami-0f1e2d3c4b5a69788")
AWS_FLAGS = ["--aws-subnet", "subnet-0a1b2c3d4e5f60718", "--aws-security-group",
             "sg-0a1b2c3d4e5f60718", "--ssh-key-name", "hybridray-ops", "--ssh-private-key",
             "/etc/hybridray/onprem-aws/ssh/hybridray-ops.pem", "--aws-ami",
             "ami-0a1b2c3d4e5f60718", "--aws-gpu-ami", "ami-0f1e2d3c4b5a69788"]


def shellcheck_or_skip() -> str:
    """The shellcheck binary (Debian package, installed by .ci/run), or skip saying why."""
    import shutil

    path = shutil.which("shellcheck")
    if path is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run does)")
    return path
