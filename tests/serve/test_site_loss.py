"""A whole site goes dark under load: requests keep succeeding from the other site.

Its own cluster (``name=t-serve-loss``), driven from a subprocess, because it kills a node;
brought down in a ``finally`` whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.paths import CLUSTERS, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def test_losing_a_site_moves_its_traffic_to_the_other_site(hybridray_home):
    from hybridray.cluster import down, ray_env, up
    from hybridray.cluster.ports import free_ports
    from hybridray.storage.fs import parse_address
    from hybridray.topology import load_topology
    from tests.serve.checkpoints import make_checkpoint

    topology = load_topology(CLUSTERS / "local.yaml", ["name=t-serve-loss"])
    source = "cloud-a:checkpoints/serve-site-loss"
    fs, path = parse_address(source, topology).resolve(topology)
    make_checkpoint(f"{path}/checkpoint_000001", data_class="internal", site="cloud-a",
                    steps=40, cluster=topology.name, home=hybridray_home)
    state = up(topology, source_file=CLUSTERS / "local.yaml", overrides=["name=t-serve-loss"],
               home=hybridray_home, dashboard=False, timeout=180)
    try:
        env = {**os.environ, **ray_env(state), "PYTHONPATH": str(ROOT)}
        env.pop("RAY_AUTH_TOKEN", None)        # it would win over this cluster's token path
        proc = subprocess.run(
            [sys.executable, "-m", "tests.serve.site_loss_driver", state.name,
             str(free_ports(1)[0]), source],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert lines, f"driver failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        result = json.loads(lines[-1][len("RESULT "):])
    finally:
        down(state.name, home=hybridray_home)
    assert result["before"].get("cloud-b", 0) > 0, result      # the caller's site, first
    assert sum(result["after"].values()) >= 40, result
    assert result["failed"] == 0, result["errors"][:5]          # with the client's retries
    assert set(result["after"]) <= {"cloud-a", "cloud-b"}
    assert result["after"].get("cloud-a", 0) >= 35, result      # the other site took over
