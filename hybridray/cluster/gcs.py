"""Read a cluster's nodes and resources straight from its GCS, as plain dicts.

``up`` (waiting for nodes to register) and ``status`` need what the GCS knows, but becoming a
Ray driver for that costs a second or two, registers a job in the cluster and fails when the
calling process is already the driver of another cluster. A bare GCS client does neither, and
answers in milliseconds. It is Ray-internal (``ray._raylet.GcsClient``), so every use of it is
kept in this one module; hybridray pins Ray to 2.60.x.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from hybridray.cluster.auth import token_auth
from hybridray.cluster.plan import NODE

ALIVE = 0  # GcsNodeInfo.GcsNodeState.ALIVE
KV_NAMESPACE = b"hybridray"


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[V6]:PORT``) as a pair; ValueError when it is not one."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether anything accepts a TCP connection at ``address`` (no Ray involved)."""
    try:
        host, port = split_address(address)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


@dataclass
class GcsNode:
    """One node as the GCS sees it."""

    node_id: str
    key: str | None            # the hybridray.io/node label (None: not started by hybridray)
    alive: bool
    temp_dir: str = ""         # the node's Ray --temp-dir, which tells two attempts apart
    address: str = ""          # the node's IP as Ray advertises it
    started_ms: int = 0        # when the node registered (epoch milliseconds; 0: unknown)
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

    # Ray's internal KV, namespace ``hybridray`` (see ``mirror.py``)
    def kv_put(self, key: str, value: str | bytes, timeout: float = 5) -> None:
        data = value.encode() if isinstance(value, str) else value
        self._client.internal_kv_put(key.encode(), data, True, KV_NAMESPACE, timeout=timeout)

    def kv_get(self, key: str | bytes, timeout: float = 5) -> bytes | None:
        raw = key.encode() if isinstance(key, str) else key
        return self._client.internal_kv_get(raw, KV_NAMESPACE, timeout=timeout)

    def kv_keys(self, prefix: str, timeout: float = 5) -> list[bytes]:
        return list(self._client.internal_kv_keys(prefix.encode(), KV_NAMESPACE,
                                                  timeout=timeout) or [])

    def kv_del(self, key: str | bytes, timeout: float = 5) -> None:
        raw = key.encode() if isinstance(key, str) else key
        self._client.internal_kv_del(raw, False, KV_NAMESPACE, timeout=timeout)

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
                temp_dir=info.temp_dir, address=getattr(info, "node_manager_address", ""),
                started_ms=int(getattr(info, "start_time_ms", 0) or 0),
                labels=labels, total=dict(info.resources_total),
                available=available.get(hex_id, {})))
        return out
