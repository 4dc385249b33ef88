"""``hybridray up`` of a cluster that already runs from the same file and overrides is a
no-op (every guide in docs/ starts with it); anything else of that name is still refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.paths import ROOT

pytestmark = pytest.mark.slow


def up(local_cluster, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYBRIDRAY_HOME": local_cluster.home}
    return subprocess.run([sys.executable, "-m", "hybridray", "up", "clusters/local.yaml",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_up_again_with_the_same_file_is_a_no_op_that_prints_the_env(local_cluster):
    proc = up(local_cluster)
    assert proc.returncode == 0, proc.stderr
    assert "cluster 'local' is already up from clusters/local.yaml" in proc.stdout
    assert f"export RAY_ADDRESS={local_cluster.address}" in proc.stdout
    assert "starting cluster" not in proc.stdout


def test_up_again_with_other_overrides_is_refused(local_cluster):
    proc = up(local_cluster, "sites.cloud-a.pools.0.count=2")
    assert proc.returncode == 2
    assert "cluster 'local' is already up" in proc.stderr and "hybridray down local" in \
        proc.stderr
