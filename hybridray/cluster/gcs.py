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
    death_reason: str | None = None     # why a dead node died (DEATH_REASONS), None if alive
    end_time: float | None = None       # when it died, epoch seconds


# NodeDeathInfo.Reason as the words hybridray records (audit log ``node-stop.reason``)
DEATH_REASONS = {0: "stopped", 1: "stopped", 2: "lost", 3: "preempted", 4: "idle"}


def _death(info: Any) -> dict[str, Any]:
    if info.state == ALIVE:
        return {}
    end = info.end_time_ms / 1000 if info.end_time_ms else None
    return {"death_reason": DEATH_REASONS.get(int(info.death_info.reason), "stopped"),
            "end_time": end}


def node_death(client: Any, node_id: str, timeout: float = 5) -> tuple[str | None, float | None]:
    """(reason, epoch seconds) a node died, from a bare ``GcsClient``; (None, None) while it
    is alive or unknown. Used inside Ray's autoscaler process, which is already authenticated."""
    for nid, info in client.get_all_node_info(timeout=timeout).items():
        if _hex(nid) == node_id:
            death = _death(info)
            return death.get("death_reason"), death.get("end_time")
    return None, None


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
                available=available.get(hex_id, {}), **_death(info)))
        return out

    def autoscaling(self, timeout: float = 5) -> dict[str, Any]:
        """Ray's autoscaler v2 as the GCS knows it (``autoscaling_view``)."""
        return autoscaling_view(self._client, timeout)


def _selector(selector: Any) -> dict[str, str]:
    """A protobuf ``LabelSelector`` as the ``{key: "in(a,b)"}`` dict Ray's API takes."""
    out = {}
    for c in selector.label_constraints:
        op = type(c).DESCRIPTOR.fields_by_name["operator"].enum_type.values_by_number[
            c.operator].name
        values = ",".join(c.label_values)
        out[c.label_key] = f"!in({values})" if "NOT" in op else f"in({values})"
    return out


def _request(request: Any, count: int = 1) -> dict[str, Any]:
    return {"resources": dict(request.resources_bundle), "count": count,
            "selectors": [_selector(s) for s in request.label_selectors]}


def autoscaling_view(client: Any, timeout: float = 5) -> dict[str, Any]:
    """What Ray's autoscaler v2 last reported to the GCS, and the demand it was shown.

    Keys: ``pending_launches`` (node type and count requested from the provider),
    ``pending_instances`` (launched, not yet running Ray), ``infeasible`` (requests the
    autoscaler found no node type for: the proof a request did not start a node),
    ``demands`` (pending task/actor requests with their label selectors), ``constraints``
    (``request_resources`` bundles) and ``version`` (the autoscaler's state version, which
    grows with each of its rounds).
    """
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.ParseFromString(client.get_cluster_status(timeout_s=timeout))
    st, rs = reply.autoscaling_state, reply.cluster_resource_state
    return {
        "version": int(st.autoscaler_state_version),
        "pending_launches": [{"node_type": r.ray_node_type_name, "count": int(r.count)}
                             for r in st.pending_instance_requests],
        "pending_instances": [{"node_type": i.ray_node_type_name, "instance_id": i.instance_id,
                               "details": i.details} for i in st.pending_instances],
        "infeasible": [_request(r) for r in st.infeasible_resource_requests],
        "demands": [_request(r.request, int(r.count)) for r in rs.pending_resource_requests],
        "constraints": [_request(r.request, int(r.count)) for c in
                        rs.cluster_resource_constraints for r in c.resource_requests],
    }
