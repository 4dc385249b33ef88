"""Read a cluster's nodes and resources straight from its GCS, as plain dicts.

``up`` (waiting for nodes to register) and ``status`` need what the GCS knows, but becoming a
Ray driver for that costs a second or two, registers a job in the cluster and fails when the
calling process is already the driver of another cluster. A bare GCS client does neither, and
answers in milliseconds. It is Ray-internal (``ray._raylet.GcsClient``), so every use of it is
kept in this one module; hybridray pins Ray to 2.60.x.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hybridray.cluster.auth import token_auth
from hybridray.cluster.plan import NODE

ALIVE = 0  # GcsNodeInfo.GcsNodeState.ALIVE


@dataclass
class GcsNode:
    """One node as the GCS sees it."""

    node_id: str
    key: str | None            # the hybridray.io/node label (None: not started by hybridray)
    alive: bool
    temp_dir: str = ""         # the node's Ray --temp-dir, which tells two attempts apart
    labels: dict[str, str] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    available: dict[str, float] = field(default_factory=dict)


def _hex(node_id: Any) -> str:
    return node_id.hex() if hasattr(node_id, "hex") else bytes(node_id).hex()


class GcsView:
    """A GCS client authenticated with one cluster's token; use as a context manager."""

    def __init__(self, address: str, token_path: str, tls: dict[str, str] | None = None):
        self.address = address
        self.token_path = token_path
        self._auth = token_auth(token_path, tls)
        self._client: Any = None

    def __enter__(self) -> GcsView:
        self._auth.__enter__()
        try:
            from ray._raylet import GcsClient

            self._client = GcsClient(address=self.address)
        except BaseException:
            self._auth.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._client = None
        self._auth.__exit__(*exc)

    def nodes(self, timeout: float = 5) -> list[GcsNode]:
        """Every node the GCS has seen, alive or dead, with totals and (alive) availability."""
        infos = self._client.get_all_node_info(timeout=timeout)
        available: dict[str, dict[str, float]] = {}
        try:
            usage = self._client.get_all_resource_usage(timeout=timeout)
            for item in usage.resource_usage_data.batch:
                available[item.node_id.hex()] = dict(item.resources_available)
        except Exception:  # availability is a nicety; node liveness is what matters
            pass
        out = []
        for node_id, info in infos.items():
            hex_id = _hex(node_id)
            labels = dict(info.labels)
            out.append(GcsNode(
                node_id=hex_id, key=labels.get(NODE), alive=info.state == ALIVE,
                temp_dir=info.temp_dir, labels=labels, total=dict(info.resources_total),
                available=available.get(hex_id, {})))
        return out
