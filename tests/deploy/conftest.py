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
