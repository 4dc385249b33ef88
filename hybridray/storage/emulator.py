"""The S3 server a local cluster brings along for its cloud sites' storage.

``hybridray up`` calls ``start_for`` and ``down`` calls ``stop_for``. A site gets the
cluster's loopback S3 server when its storage root is ``s3://`` with no ``endpoint`` and it
runs on this machine (``provider: local``, or any site with ``--simulate``): there is no real
bucket behind such a site, and a fixed port would collide between clusters. One server per
cluster, on a free port, serves every such site; its pid, process start time and port go into
the cluster state (``services["s3"]``), and each site's endpoint becomes an override
(``sites.NAME.storage.endpoint=http://127.0.0.1:PORT``) so ``ClusterState.topology()``, and so
``hybridray.connect()`` and every command, resolve it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hybridray.topology.models import Provider, Topology

SERVICE = "s3"


def emulated_sites(topology: Topology, *, simulate: bool = False) -> list[str]:
    """Sites whose ``s3://`` storage the cluster's own S3 server must provide."""
    return [name for name, site in topology.sites.items()
            if site.storage.scheme == "s3" and not site.storage.endpoint
            and (simulate or site.provider is Provider.local)]


def start_for(state: Any, topology: Topology, *, simulate: bool = False,
              say: Callable[[str], None] = lambda line: None) -> None:
    """Start the S3 server for ``state``'s cluster if a site needs one, and record it."""
    from hybridray.storage import s3server

    sites = emulated_sites(topology, simulate=simulate)
    if not sites:
        return
    buckets = sorted({topology.sites[s].storage.path.split("/", 1)[0] for s in sites})
    server = s3server.start(log=state.state_dir / "logs" / "s3.log", buckets=buckets)
    state.services[SERVICE] = server.to_json()
    for name in sites:
        state.overrides.append(f"sites.{name}.storage.endpoint={server.endpoint}")
        state.topology_snapshot["sites"][name]["storage"]["endpoint"] = server.endpoint
    say(f"  {'s3 storage':<14} {', '.join(sites):<14} pid {server.pid:<8} {server.endpoint}")


def stop_for(state: Any) -> bool:
    """Stop the cluster's S3 server if it is still the process that was started."""
    from hybridray.storage import s3server

    record = (getattr(state, "services", None) or {}).get(SERVICE)
    if not record:
        return False
    return s3server.stop(s3server.S3Server.from_json(record))
