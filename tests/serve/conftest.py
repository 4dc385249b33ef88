"""Fixtures for serving tests: a small trained checkpoint, a token, a Serve HTTP port."""

from __future__ import annotations

import os

import pytest

TOKEN = "test-token-" + "x" * 24


@pytest.fixture(scope="session")
def lm_checkpoint(tmp_path_factory):
    """A trained tiny GPT checkpoint (data class restricted, site onprem), built once."""
    from tests.serve.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("lm") / "checkpoint_000001", steps=40)


@pytest.fixture()
def serve_token(monkeypatch):
    monkeypatch.setenv("HYBRIDRAY_SERVE_TOKENS", f"{TOKEN},second-token-{'y' * 16}")
    return TOKEN


def serve_port() -> int:
    """The port of the running Serve proxy, or a free one for a new one."""
    from hybridray.cluster.ports import free_ports

    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        return int(client.http_config.port)
    except Exception:
        return free_ports(1)[0]


def local_topology():
    from hybridray.topology import load_topology
    from tests.paths import CLUSTERS

    os.environ.setdefault("HYBRIDRAY_HOME", "/tmp/hybridray-test-home")
    return load_topology(CLUSTERS / "local.yaml")
