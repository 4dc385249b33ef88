"""Real local clusters for the cluster tests: started once per module, always brought down.

These tests stop clusters and kill their nodes, so they bring up their own (``module_cluster``,
named ``local``, and ``second_cluster``, ``local2``) in a private home instead of using the
session-wide cluster of ``tests/conftest.py``. Starting one costs ~20 s of an idle 2-core
machine, so the module shares them. Teardown runs ``down`` in a ``finally`` whatever the tests
did, and then checks that no process of the cluster survived.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybridray.cluster import ClusterState, down, ray_env, up
from hybridray.cluster.state import processes_using
from hybridray.topology import load_topology
from tests.paths import CLUSTERS

LOCAL_YAML = CLUSTERS / "local.yaml"
UP_TIMEOUT_S = 300  # generous: a busy machine starts slowly, and that is not what is tested


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (e.g. a cluster's Ray temp dir)."""
    return processes_using(text)


def temp_prefix(name: str) -> str:
    """The start of every Ray temp dir of cluster ``name`` (whatever its home)."""
    return f"/tmp/hr-{os.getuid()}-{name}-"


def start(home: Path, *overrides: str, dashboard: bool = False) -> ClusterState:
    topology = load_topology(LOCAL_YAML, list(overrides))
    return up(topology, source_file=LOCAL_YAML, overrides=overrides, home=home,
              dashboard=dashboard, timeout=UP_TIMEOUT_S)


def stop(state: ClusterState, home: Path) -> None:
    down(state.name, home=home)
    leftovers = processes_mentioning(state.temp_dir + "/")
    assert leftovers == [], f"processes of {state.name} survived down: {leftovers}"


def run_driver(state: ClusterState, code: str, *, token: bool = True,
               expect_refusal: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` as a separate driver process (a user's script), with or without the token.

    The code gets ``ADDRESS``; what it prints as its last line is parsed by ``driver_json``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HYBRIDRAY_"))}
    if token:
        env.update(ray_env(state))
    else:
        env["HOME"] = str(Path(state.home) / "no-token-home")  # no ~/.ray/auth_token either
    if expect_refusal or not token:
        env["RAY_gcs_server_port_wait_time_s"] = "2"  # give up in ~2 s, not Ray's ~20 s
    prelude = f"import json, ray\nADDRESS = {state.address!r}\n"
    return subprocess.run([sys.executable, "-c", prelude + code], env=env, text=True,
                          capture_output=True, timeout=timeout)


def driver_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hybridray-home")


@pytest.fixture(scope="module")
def module_cluster(home):
    """clusters/local.yaml as a real cluster: head + one node at each of three sites."""
    state = start(home)
    try:
        yield state
    finally:
        stop(state, home)


@pytest.fixture(scope="module")
def second_cluster(home, module_cluster):
    """``name=local2`` beside ``local``, with the dashboard on (for ``ray job submit``)."""
    state = start(home, "name=local2", dashboard=True)
    try:
        yield state
    finally:
        stop(state, home)
