"""A Ray cluster started the way an operator would, with plain ``ray start``, not ``hybridray up``.

Token auth and mutual TLS from the files ``hybridray certs`` writes, nodes labelled with
``hybridray.labels.node_labels``. Every ``ray start --block`` runs in its own session; the
test records each one and stops exactly those (and whatever still runs from the cluster's
own temp dir), also when a test fails. Used by ``test_attach.py``; ``add_node`` is how a test
adds a rogue node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hybridray import labels as L
from hybridray.cluster.ports import free_ports
from hybridray.procs import processes_using
from hybridray.topology.models import Topology

RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE = str(150 * 2**20)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray or hybridray setting: a fresh shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HYBRIDRAY_"))}
    env.update(extra)
    return env


@dataclass
class PlainCluster:
    """Head plus nodes of one topology, each a ``ray start --block`` process we started."""

    topology: Topology
    secrets: Path                       # a `hybridray certs` directory
    logs: Path
    node_home: Path                     # HYBRIDRAY_HOME on the nodes: empty, like a remote host
    ip: str
    temp_root: str = field(default_factory=lambda: f"/tmp/hra-{os.getuid()}-{os.getpid()}")
    procs: list[subprocess.Popen] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.ports['gcs']}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    def env(self, site: str | None = None) -> dict[str, str]:
        """A node's environment: the certificate `hybridray certs` issued for its (local)
        site, what every node trusts, the token."""
        bindir = str(Path(sys.executable).parent)
        cert = self.secrets / "nodes" / f"local-{site or self.topology.head.site}"
        return clean_env(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.secrets / "token"),
            RAY_USE_TLS="1", RAY_TLS_SERVER_CERT=f"{cert}.crt", RAY_TLS_SERVER_KEY=f"{cert}.key",
            RAY_TLS_CA_CERT=str(self.secrets / "trust.pem"), RAY_USAGE_STATS_ENABLED="0",
            HYBRIDRAY_HOME=str(self.node_home),
            PATH=os.pathsep.join([bindir, os.environ.get("PATH", "")]),
            DASHBOARD_METRIC_PORT=str(self.ports["dashboard_metrics"]),
            AUTOSCALER_METRIC_PORT=str(self.ports["autoscaler_metrics"]),
            RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=f"{self.temp_root}/haproxy/haproxy.cfg",
            RAY_SERVE_HAPROXY_METRICS_PORT=str(self.ports["haproxy_metrics"]),
            RAY_SERVE_HAPROXY_STATS_PORT=str(self.ports["haproxy_stats"]))

    def start_head(self) -> None:
        os.makedirs(self.temp_root, mode=0o700, exist_ok=True)
        names = ("gcs", "dashboard", "client", "dashboard_metrics", "autoscaler_metrics",
                 "haproxy_metrics", "haproxy_stats")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        head = self.topology.head.site
        self._start("head", head, L.node_labels(self.topology, head, None, role="head"),
                    L.node_resources(head, None), 0,
                    ["--head", "--port", str(self.ports["gcs"]),
                     "--ray-client-server-port", str(self.ports["client"]),
                     "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.ports["dashboard"])])

    def add_node(self, name: str, site: str, *, cpus: int = 2,
                 labels: dict[str, str] | None = None) -> None:
        """A worker with the labels of ``site``'s first pool (``labels`` overrides them)."""
        pool = self.topology.sites[site].pools[0]
        want = {**L.node_labels(self.topology, site, pool), **(labels or {})}
        self._start(name, site, want, L.node_resources(site, pool), cpus,
                    ["--address", self.address])

    def _start(self, name: str, site: str, labels: dict[str, str],
               resources: dict[str, float], cpus: int, extra: list[str]) -> None:
        agent = free_ports(1, exclude=set(self.ports.values()))[0]
        temp = f"{self.temp_root}/{len(self.procs)}"
        args = [RAY, "start", "--block", "--disable-usage-stats", "--temp-dir", temp,
                "--num-cpus", str(cpus), "--object-store-memory", OBJECT_STORE,
                "--labels", L.labels_arg(labels), "--resources", json.dumps(resources),
                "--dashboard-agent-listen-port", str(agent), *extra]
        log = open(self.logs / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(args, env=self.env(site), stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    def wait_for(self, alive: int, timeout: float = 240) -> list[dict]:
        """Block until ``alive`` nodes are registered and alive; returns every node."""
        code = f"""
import json, time
from hybridray.cluster.gcs import GcsView
deadline = time.monotonic() + {timeout}
while True:
    with GcsView({self.address!r}, {str(self.secrets / "token")!r}, {self._tls()!r}) as v:
        nodes = [{{"node_id": n.node_id, "alive": n.alive, "labels": n.labels}}
                 for n in v.nodes()]
    if sum(n["alive"] for n in nodes) >= {alive} or time.monotonic() > deadline:
        break
    time.sleep(1)
print(json.dumps(nodes))
"""
        out = subprocess.run([sys.executable, "-c", code], env=clean_env(), text=True,
                             capture_output=True, timeout=timeout + 60)
        assert out.returncode == 0, out.stderr[-3000:]
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        assert sum(n["alive"] for n in nodes) >= alive, (nodes, self.log_tails())
        return nodes

    def _tls(self) -> dict[str, str]:
        return {k: v for k, v in self.env().items() if k.startswith("RAY_TLS") or
                k == "RAY_USE_TLS"}

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        """Stop every node we started (workers, then the head), then anything left in our
        temp dir."""
        workers, head = self.procs[1:], self.procs[:1]
        for batch, sig, wait in ((workers, signal.SIGTERM, 15), (head, signal.SIGTERM, 10),
                                 (self.procs, signal.SIGKILL, 5)):
            for proc in batch:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait
            for proc in batch:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.1, deadline - time.monotonic()))
        for pid in processes_using(self.temp_root + "/"):  # e.g. workers orphaned by a group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_root, ignore_errors=True)
