"""Bring a planned cluster's nodes up: launch them, watch them register, retry a slow start.

Every node is a ``ray start --block`` process of its own session (pid == pgid, so the node,
raylet and workers included, can be signalled as one group) with its own log file, Ray temp
dir and agent port. On a busy machine Ray's own startup deadlines (15 s for the dashboard
agent, 30 s for the raylet to register) make nodes give up, so workers start as many at a
time as there are idle cores, and a worker that gave up that way is relaunched once. Each
process is recorded in ``state.json`` the moment it starts, so ``down`` always finds it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

from hybridray.cluster.auth import TLS_VARS, auth_env
from hybridray.cluster.gcs import GcsView
from hybridray.cluster.plan import NodeSpec, ray_start_args
from hybridray.cluster.ports import free_ports
from hybridray.cluster.state import (
    ClusterState,
    NodeRecord,
    process_start_time,
    reap,
    save_state,
)
from hybridray.exceptions import ClusterError

MAX_ATTEMPTS = 2          # per worker: one retry after a transient exit while starting
# What `ray start` prints when one of Ray's own startup deadlines passed on a busy machine.
RAY_GAVE_UP = ("timed out during startup", "Timed out waiting for node info",
               "Timed out waiting for file",
               # the head's dashboard did not register within RAY_DASHBOARD_STARTUP_TIMEOUT_S
               # (60 s); with ", return code N" after it, the dashboard crashed instead
               "Failed to start the dashboard \n")
# ... and those plus a lost race for a port: failures of the moment, not of the node's
# configuration (which a retry would only repeat).
TRANSIENT = (*RAY_GAVE_UP, "already in use", "Failed to bind")
Progress = Callable[[str], None]


class Startup:
    """Starts the nodes of ``state`` and waits until the GCS lists every one of them alive."""

    def __init__(self, state: ClusterState, *, timeout: float, say: Progress,
                 window: int | None = None):
        self.state = state
        self.say = say
        self.window = window or _start_window()  # workers starting at once
        self.started = time.monotonic()
        self.timeout = timeout                  # per node, from its own launch
        self.launched_at: dict[str, float] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.attempts: Counter[str] = Counter()
        self.launches = 0
        self.used_ports = set(state.ports.values())

    def run(self, specs: list[NodeSpec]) -> None:
        """The head; once it has registered, the workers, ``window`` at a time.

        Workers wait for the head's registration, not just its GCS port: until then the
        head's raylet is waiting (15 s at most, inside Ray) for its dashboard agent, and
        workers importing Ray beside it are what makes that agent late on a small machine.
        """
        head, workers = specs[0], specs[1:]
        self._launch(head)
        self._wait_for_gcs()
        queue = deque(workers)
        pending: dict[str, NodeSpec] = {head.key: head}   # launched, not yet registered
        with GcsView(self.state.address, self.state.token_path, self.state.tls) as gcs:
            while True:
                while (queue and head.key not in pending
                       and len(pending) < self.window):
                    spec = queue.popleft()
                    self._launch(spec)
                    pending[spec.key] = spec
                self._check_exits(pending)
                try:
                    seen = gcs.nodes(timeout=2)
                except Exception:  # the GCS may still be warming up; give it the timeout
                    seen = []
                for info in seen:  # the temp dir tells this attempt from a failed one
                    if (info.alive and info.key in pending
                            and info.temp_dir == self._record(info.key).temp_dir):
                        del pending[info.key]
                        self._registered(info.key, info.node_id)
                if not pending and not queue:
                    return
                late = [k for k in pending
                        if time.monotonic() - self.launched_at[k] > self.timeout]
                if late:
                    raise self.failure(late[0], "did not register with the GCS within "
                                       f"{self.timeout:.0f}s of starting")
                time.sleep(0.2)

    # ---- one node ---------------------------------------------------------------------

    def _launch(self, spec: NodeSpec) -> None:
        state = self.state
        self.attempts[spec.key] += 1
        temp_dir = f"{state.temp_dir}/{self.launches}"  # own dir: Ray names sockets per dir
        self.launches += 1
        os.mkdir(temp_dir, 0o700)
        agent_port = free_ports(1, exclude=self.used_ports)[0]
        self.used_ports.add(agent_port)
        args = ray_start_args(spec, temp_dir=temp_dir, gcs_address=state.address,
                              ports=state.ports, agent_port=agent_port,
                              dashboard=state.dashboard,
                              autoscaling_config=state.autoscaler.get("config")
                              if spec.role == "head" else None)
        log = state.state_dir / "logs" / f"{spec.key}.log"
        with open(log, "ab") as out:
            if self.attempts[spec.key] > 1:
                out.write(f"\n--- hybridray: attempt {self.attempts[spec.key]} ---\n".encode())
                out.flush()
            proc = subprocess.Popen([*_ray_command(), "start", *args], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=_child_env(state, spec.role), start_new_session=True,
                                    cwd=state.state_dir)
        self.procs[spec.key] = proc
        self.launched_at[spec.key] = time.monotonic()
        start_time = process_start_time(proc.pid)
        record = NodeRecord(
            key=spec.key, site=spec.site, pool=spec.pool, role=spec.role, index=spec.index,
            pid=proc.pid, pgid=proc.pid, start_time=start_time if start_time is not None else -1,
            log=str(log), temp_dir=temp_dir, cpus=spec.cpus, gpus=spec.gpus,
            price_per_hour=spec.price_per_hour, agent_port=agent_port)
        old = [i for i, n in enumerate(state.nodes) if n.key == spec.key]
        if old:
            state.nodes[old[0]] = record
        else:
            state.nodes.append(record)
        save_state(state)

    def _record(self, key: str) -> NodeRecord:
        return next(n for n in self.state.nodes if n.key == key)

    def _registered(self, key: str, node_id: str) -> None:
        node = self._record(key)
        node.node_id = node_id
        where = "head" if node.role == "head" else f"{node.pool} #{node.index}"
        self.say(f"  {node.site:<14} {where:<14} pid {node.pid:<8} "
                 f"up after {time.monotonic() - self.started:5.1f}s")

    def _check_exits(self, pending: dict[str, NodeSpec]) -> None:
        for key, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            if key not in pending:
                raise self.failure(key, f"exited with code {code} after it had registered")
            spec = pending[key]
            node = self._record(key)
            reason = log_tail(node.log, 1).strip()
            if (spec.role == "head" or self.attempts[key] >= MAX_ATTEMPTS
                    or not any(t in log_tail(node.log, 40) for t in TRANSIENT)):
                raise self.failure(key, f"exited with code {code} while starting")
            self.say(f"  {node.site:<14} {f'{node.pool} #{node.index}':<14} pid {node.pid:<8} "
                     f"exited while starting ({reason[:100]}); retrying")
            if node.group():  # what the failed attempt had started already
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(node.pgid, signal.SIGKILL)
            reap(node.pid)
            self._launch(spec)

    def _wait_for_gcs(self) -> None:
        """Until the head's GCS accepts connections: then workers can start joining it."""
        port = self.state.ports["gcs"]
        while time.monotonic() - self.launched_at["head"] < self.timeout:
            code = self.procs["head"].poll()
            if code is not None:
                raise self.failure("head", f"exited with code {code} while starting")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=0.5):
                return
            time.sleep(0.1)
        raise self.failure("head", f"did not open its GCS port {port} in time")

    def failure(self, key: str, why: str) -> ClusterError:
        """A ClusterError naming the node, with its log tail; Ray's own logs are kept."""
        node = self._record(key)
        where = "head" if node.role == "head" else f"node {node.site}/{node.pool}#{node.index}"
        kept = ""
        ray_logs = Path(node.temp_dir) / "session_latest" / "logs"
        if ray_logs.is_dir():
            target = self.state.state_dir / "logs" / f"{key}.ray"
            with contextlib.suppress(OSError, shutil.Error):
                shutil.copytree(ray_logs, target, symlinks=True, dirs_exist_ok=True)
                kept = f"\nRay's own logs of that node (raylet.err, ...) are in {target}"
        # the whole tail: Ray prints a dashboard's own log and a traceback after its reason
        slow = any(t in log_tail(node.log, 400) + "\n" for t in RAY_GAVE_UP)
        hint = ""
        if slow:
            load, cores = os.getloadavg()[0], os.cpu_count() or 1
            hint = (f"\nRay gave up on a slow start (load average {load:.1f} on {cores} "
                    "cores); run hybridray up again when the machine is less busy")
        error = ClusterError(f"cluster {self.state.name!r}: {where} {why}; last lines of "
                             f"{node.log}:\n{log_tail(node.log)}{kept}{hint}")
        error.ray_gave_up = slow  # type: ignore[attr-defined]
        return error


def _start_window() -> int:
    """How many workers may start at once: the idle cores, but at least two (or one core).

    A starting node runs half a dozen Python processes; when they fight for the CPU, Ray's
    own 15 s and 30 s startup deadlines (not configurable) make nodes crash on their own.
    Fewer than two at a time made ``up`` several times slower on a busy machine, while the
    one retry per worker absorbs the occasional crash.
    """
    cores = os.cpu_count() or 1
    return max(min(2, cores), min(cores, round(cores - os.getloadavg()[0])))


def log_tail(path: str | os.PathLike, lines: int = 15) -> str:
    """The last ``lines`` lines of a log, indented, for an error message."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"  (cannot read the log: {e})"
    return "\n".join("  " + line for line in text.splitlines()[-lines:])


def _ray_command() -> list[str]:
    exe = Path(sys.executable).parent / "ray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def _child_env(state: ClusterState, role: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", *TLS_VARS)}
    env.update(auth_env(state.token_path))
    env.update(state.tls)  # Ray's gRPC TLS, when the cluster runs with it
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Job entrypoints (`ray job submit -- python x.py`) run with the node's PATH: make `python`
    # the interpreter hybridray runs in, which has Ray and hybridray, not whatever is first.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, *(p for p in env.get("PATH", "").split(os.pathsep)
                                             if p and p != bindir)])
    if role == "head":  # the head's two Prometheus endpoints have fixed defaults otherwise
        env["DASHBOARD_METRIC_PORT"] = str(state.ports["dashboard_metrics"])
        env["AUTOSCALER_METRIC_PORT"] = str(state.ports["autoscaler_metrics"])
        env.update(haproxy_env(state))
        if state.autoscaler:  # elastic pools: Ray's autoscaler v2 with the local provider
            from hybridray.cluster.elastic import head_env

            env.update(head_env(state.autoscaler["interval_s"]))
    return env


def haproxy_env(state: ClusterState) -> dict[str, str]:
    """Serve's HAProxy proxy (``RAY_SERVE_ENABLE_HA_PROXY=1``, head-only proxies) per cluster.

    Ray's defaults are machine-wide ports (9101 and 8404), so a second cluster's HAProxy
    could not start; and an HAProxy left in its graceful stop (up to 120 s) after its
    manager died was invisible to ``down``. With its config file under the cluster's temp
    dir its command line names that dir, which ``down`` sweeps. (Its unix sockets stay in
    Ray's short default directory, per node: HAProxy allows 97 bytes of socket path.)
    """
    if "haproxy_metrics" not in state.ports:     # a cluster started by an older hybridray
        return {}
    return {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state.temp_dir}/haproxy/haproxy.cfg",
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(state.ports["haproxy_metrics"]),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(state.ports["haproxy_stats"])}
