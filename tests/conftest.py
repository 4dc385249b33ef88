"""Session-wide fixtures: one real three-site cluster shared by every test module that needs it.

Starting a cluster costs many seconds of a 2-core machine, so modules share ``local_cluster``
(``hybridray up clusters/local.yaml`` in a temporary ``HYBRIDRAY_HOME``) and ``hr_cluster``
(this pytest process connected to it as a driver). Rules for modules that use them: never call
``ray.init``/``ray.shutdown`` yourself, clean up actors and Serve apps you start, and never kill
this cluster's nodes — chaos tests bring up their own cluster under another name.
"""

from __future__ import annotations

import os

import pytest

from tests.paths import CLUSTERS

UP_TIMEOUT_S = 180  # a busy 2-core machine can be slow; a slow start is not what is tested


@pytest.fixture(scope="session")
def hybridray_home(tmp_path_factory):
    """A private HYBRIDRAY_HOME for the session: state, audit logs, storage roots."""
    home = tmp_path_factory.mktemp("hrhome")
    old = os.environ.get("HYBRIDRAY_HOME")
    os.environ["HYBRIDRAY_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("HYBRIDRAY_HOME", None)
    else:
        os.environ["HYBRIDRAY_HOME"] = old


@pytest.fixture(scope="session")
def local_cluster(hybridray_home):
    """clusters/local.yaml running for real: head + onprem, cloud-a, cloud-b (2 CPUs each).

    Its file:// storage roots live under ``${HYBRIDRAY_HOME}``, i.e. the session's home.
    """
    from hybridray.cluster import down, up
    from hybridray.exceptions import ClusterError
    from hybridray.topology import load_topology

    topology = load_topology(CLUSTERS / "local.yaml")
    for attempt in (1, 2):  # one retry: Ray's own node start-up can time out on a busy box
        try:
            state = up(topology, source_file=CLUSTERS / "local.yaml", home=hybridray_home,
                       dashboard=True, timeout=UP_TIMEOUT_S)
            break
        except ClusterError:
            if attempt == 2:
                raise  # up() already stopped whatever it had started
    try:
        yield state
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            down(state.name, home=hybridray_home)


@pytest.fixture(scope="session")
def hr_cluster(local_cluster, hybridray_home):
    """A ``hybridray.Cluster`` for ``local_cluster``, with this process connected as driver."""
    import hybridray

    return hybridray.connect(local_cluster.name, home=hybridray_home)
