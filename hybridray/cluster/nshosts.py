"""``hybridray up FILE --hosts netns``: rehearse a real deployment on one machine.

Every node becomes a host: a network namespace with its own address (``netns.py`` makes the
bridges, veths and shaped links), and it is started the way an operator starts an on-prem
host: by the join script ``hybridray render`` writes for a static host (a service loop that
restarts Ray with backoff, so a node cut off by a partition comes back by itself), with
token auth and mutual TLS on and the certificates ``hybridray certs`` makes (a site CA per
site, a certificate per host whose SANs carry the host's IP). Rendering treats every site as static
hosts whose addresses are the namespaces' addresses; the scripts and their ``cluster.env`` are
kept in the cluster's state directory, so what ran can be read afterwards.

Drivers run where they run on a real cluster: on a host of it. ``hybridray`` commands that
drive the cluster move themselves into the head's namespace (``driver_host``); a Python
driver is run there with ``ip netns exec`` (``hybridray env NAME`` prints the line).
``down`` stops the service loops, then anything still running in the namespaces, then removes
every namespace, link and qdisc the record lists, and the cluster's keys; so does a failed
``up``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from hybridray.cluster import netns
from hybridray.cluster.gcs import GcsView
from hybridray.cluster.plan import NodeSpec
from hybridray.cluster.state import (
    ClusterState,
    NodeRecord,
    process_start_time,
    save_state,
)
from hybridray.deploy import network
from hybridray.exceptions import ClusterError, NetnsError
from hybridray.topology.models import Topology

UP_TIMEOUT_S = 120.0
#: the head's node health checks in a rehearsal (Ray's defaults: 3 s, 10 s, 5 failures)
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                 "RAY_health_check_failure_threshold": "5"}


def up(topology: Topology, *, state: ClusterState, specs: list[NodeSpec],
       simulate: bool, timeout: float, say) -> None:
    """Make the hosts and start every node in ``state`` (already saved, its dirs made).

    The caller (``local.up``) holds the cluster lock and, on any error, calls ``stop``.
    """
    home = Path(state.home)
    prefix = netns.prefix_for(state.name, home)
    _remove_orphans(prefix, say)
    with netns.allocation_lock():
        subnet = netns.free_subnet()
        rec = netns.plan(prefix, subnet, list(topology.sites),
                         [(s.key, s.site) for s in specs])
        state.netns = rec.to_json()
        save_state(state)

        def record() -> None:
            state.netns = rec.to_json()
            save_state(state)

        netns.Builder(rec, save=record).build()
    links = [(src, dst, link.bandwidth_mbps, link.latency_ms)
             for src in topology.sites for dst in topology.sites
             if (link := topology.link(src, dst)) is not None]
    for line in netns.shape(rec, links):
        say(line)
    unshaped = sorted({tuple(sorted((a, b))) for a in topology.sites for b in topology.sites
                       if a != b and topology.link(a, b) is None})
    for a, b in unshaped:
        say(f"  link {a} <-> {b}: not declared, so not shaped")
    record()
    head = rec.host("head")
    state.address = f"{head.ip}:{network.GCS}"
    state.ports = {"gcs": network.GCS, "dashboard": network.DASHBOARD,
                   "client_server": network.CLIENT_SERVER}
    hosts_dir = state.state_dir / "hosts"
    static = static_topology(topology, rec)
    tls = _certificates(state, rec, static)
    state.tls = tls["head"]
    _render(static, state, rec, hosts_dir)
    save_state(state)
    _start_storage(state, topology, rec, simulate, say)
    started = time.monotonic()
    _launch(state, rec, specs[0], hosts_dir)
    _wait_for_gcs(state, head.ip, timeout)
    for spec in specs[1:]:
        _launch(state, rec, spec, hosts_dir)
    _wait_registered(state, specs, timeout, say, started)
    _enroll(state, len(specs), timeout, say)


# ---- certificates and scripts ---------------------------------------------------------------

def _certificates(state: ClusterState, rec: netns.NetRecord,
                  static: Topology) -> dict[str, dict[str, str]]:
    """What ``hybridray certs`` makes for the static form: the cluster's token (this
    cluster's own), a root CA, an intermediate CA per site, and a certificate per host whose
    SANs carry the host's IP; every node trusts ``trust.pem`` (the site intermediates)."""
    from hybridray.deploy.secrets import make_secrets

    secrets = state.state_dir / "secrets"
    secrets.mkdir(mode=0o700)
    shutil.copy2(state.token_path, secrets / "token")  # kept by make_secrets: one token
    make_secrets(static, secrets, head=rec.host("head").ip)
    return {host.key: host_tls(state, host) for host in rec.hosts}


def static_topology(topology: Topology, rec: netns.NetRecord) -> Topology:
    """``topology`` with every site as static hosts at the namespaces' addresses."""
    data = topology.model_dump(mode="json")
    for name, site in data["sites"].items():
        site["provider"] = "static"
        for key in ("namespace",):
            site.pop(key, None)
        for pool in site["pools"]:
            ips = [h.ip for h in rec.hosts if h.site == name
                   and h.key.startswith(f"{name}.{pool['name']}.")]
            pool["hosts"] = ips
            count = len(ips)
            pool["count"], pool["min"], pool["max"] = count, None, None
            pool.pop("instance_type", None)
            pool.pop("node_selector", None)
            if count == 0:
                pool["hosts"] = []
    data["sites"] = {n: s for n, s in data["sites"].items()
                     if any(p["count"] for p in s["pools"]) or n == topology.head.site}
    for site in data["sites"].values():
        site["pools"] = [p for p in site["pools"] if p["count"]] or site["pools"][:1]
        site["links"] = {k: v for k, v in site["links"].items() if k in data["sites"]}
    return Topology.model_validate(data)


def _render(static: Topology, state: ClusterState, rec: netns.NetRecord,
            hosts_dir: Path) -> None:
    """``hybridray render`` of the static form: the scripts the hosts run, kept on disk."""
    from hybridray.deploy.common import RenderOptions
    from hybridray.deploy.render import build, write

    head = rec.host("head")
    rendered = build(static, RenderOptions(head_address=f"{head.ip}:{network.GCS}", tls=True))
    write(rendered, hosts_dir / "render", force=True)
    state.services["netns_render"] = {"dir": str(hosts_dir / "render"),
                                      "scripts": _scripts(rendered, rec)}


def _scripts(rendered, rec: netns.NetRecord) -> dict[str, str]:
    """Which rendered script each host runs: head.sh for the head, join-POOL-N.sh by IP."""
    out = {}
    by_ip = {host: path for path, host in rendered.hosts.items()}
    for host in rec.hosts:
        if host.key == "head":
            out[host.key] = f"{host.site}/head.sh"
        else:
            out[host.key] = by_ip[host.ip]
    return out


def _host_env(state: ClusterState, host: netns.NetHost, hosts_dir: Path) -> Path:
    """The host's ``cluster.env`` (the rendered scripts' interface): head, token, its own
    certificate, its address and Ray's temp dir, the ray of this environment."""
    tls = host_tls(state, host)
    temp = host_temp_dir(state, host)
    os.makedirs(temp, mode=0o700, exist_ok=True)
    values = {
        "HYBRIDRAY_HEAD_ADDRESS": state.address,
        "HYBRIDRAY_TOKEN_FILE": state.token_path,
        "HYBRIDRAY_TLS_CA": tls["RAY_TLS_CA_CERT"],
        "HYBRIDRAY_TLS_CERT": tls["RAY_TLS_SERVER_CERT"],
        "HYBRIDRAY_TLS_KEY": tls["RAY_TLS_SERVER_KEY"],
        "HYBRIDRAY_NODE_IP": host.ip,
        "HYBRIDRAY_TEMP_DIR": temp,
        "HYBRIDRAY_RAY": str(Path(sys.executable).parent / "ray"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        # a rehearsal's drills should not wait a minute: restart a node every 10 s at most
        "HYBRIDRAY_RESTART_MAX_DELAY": "10",
        # torch.distributed binds where the host name resolves (loopback here): name the NIC
        "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0",
        **storage_env(state),
    }
    if host.key == "head":  # the GCS declares a cut-off node dead after ~10 s, not ~30 s
        values.update(HEALTH_CHECKS)
    lines = [f"# cluster.env of host {host.ip} ({host.key}) of namespace cluster {state.name}"]
    lines += [f'{k}="{v}"' for k, v in values.items()]
    hosts_dir.mkdir(parents=True, exist_ok=True)
    path = hosts_dir / f"{host.key}.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def storage_env(state: ClusterState) -> dict[str, str]:
    """Credentials for the cluster's emulated S3 sites, as a real host has its own.

    Off loopback, hybridray does not hand the emulator's placeholder keys out by itself (a
    real endpoint needs real ones), so hosts and drivers get them in their environment.
    """
    from hybridray.storage.s3server import EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY

    if not any(k.startswith("s3-") for k in state.services):
        return {}
    return {"AWS_ACCESS_KEY_ID": EMULATOR_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": EMULATOR_SECRET_KEY}


def host_temp_dir(state: ClusterState, host: netns.NetHost) -> str:
    """Ray's --temp-dir of a host: short (unix socket paths hold 107 bytes), one per host."""
    index = netns.NetRecord.from_json(state.netns).hosts.index(host)
    return f"{state.temp_dir}/{index}"


def host_tls(state: ClusterState, host: netns.NetHost) -> dict[str, str]:
    """Ray's TLS variables for a process on ``host``: the certificate naming its IP."""
    return {"RAY_USE_TLS": "1", **_certificates_of(state, host)}


def _certificates_of(state: ClusterState, host: netns.NetHost) -> dict[str, str]:
    secrets = (state.state_dir / "secrets").absolute()
    name = "head" if host.key == "head" else host.ip  # as hybridray certs names them
    return {"RAY_TLS_CA_CERT": str(secrets / "trust.pem"),
            "RAY_TLS_SERVER_CERT": str(secrets / "nodes" / f"{name}.crt"),
            "RAY_TLS_SERVER_KEY": str(secrets / "nodes" / f"{name}.key")}


# ---- starting -----------------------------------------------------------------------------

def _launch(state: ClusterState, rec: netns.NetRecord, spec: NodeSpec, hosts_dir: Path) -> None:
    host = rec.host(spec.key)
    script = Path(state.services["netns_render"]["dir"]) / \
        state.services["netns_render"]["scripts"][spec.key]
    env_file = _host_env(state, host, hosts_dir)
    log = state.state_dir / "logs" / f"{spec.key}.log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "HYBRIDRAY_"))}
    env.update({"HYBRIDRAY_CONF": str(env_file), "RAY_USAGE_STATS_ENABLED": "0"})
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "bash", str(script)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, cwd=state.state_dir)
    start_time = process_start_time(proc.pid)
    state.nodes.append(NodeRecord(
        key=spec.key, site=spec.site, pool=spec.pool, role=spec.role, index=spec.index,
        pid=proc.pid, pgid=proc.pid, start_time=start_time if start_time is not None else -1,
        log=str(log), temp_dir=host_temp_dir(state, host), cpus=spec.cpus, gpus=spec.gpus,
        price_per_hour=spec.price_per_hour, agent_port=network.DASHBOARD_AGENT_HTTP))
    save_state(state)


def _wait_for_gcs(state: ClusterState, ip: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    head = state.head
    while time.monotonic() < deadline:
        if not head.alive():
            raise _failure(state, "head", "its service loop exited")
        with contextlib.suppress(OSError), socket.create_connection((ip, network.GCS),
                                                                   timeout=0.5):
            return
        time.sleep(0.2)
    raise _failure(state, "head", f"did not open its GCS port {ip}:{network.GCS} in time")


def _wait_registered(state: ClusterState, specs: list[NodeSpec], timeout: float, say,
                     started: float) -> None:
    """Until the GCS lists every planned node alive (restarts by the loop are fine)."""
    deadline = time.monotonic() + timeout
    pending = {s.key for s in specs}
    with GcsView(state.address, state.token_path, state.tls) as gcs:
        while pending:
            try:
                seen = gcs.nodes(timeout=2)
            except Exception:  # the GCS may still be warming up
                seen = []
            for info in seen:
                if info.alive and info.key in pending:
                    pending.discard(info.key)
                    rec = next(n for n in state.nodes if n.key == info.key)
                    rec.node_id = info.node_id
                    host = netns.NetRecord.from_json(state.netns).host(info.key)
                    where = "head" if rec.role == "head" else f"{rec.pool} #{rec.index}"
                    say(f"  {rec.site:<14} {where:<14} {host.ip:<15} ns {host.netns:<28} up after "
                        f"{time.monotonic() - started:5.1f}s")
            for key in pending:
                node = next(n for n in state.nodes if n.key == key)
                if not node.alive():
                    raise _failure(state, key, "its service loop exited")
            if time.monotonic() > deadline:
                raise _failure(state, sorted(pending)[0],
                               f"did not register with the GCS within {timeout:.0f}s")
            if pending:
                time.sleep(0.3)
    save_state(state)


def _enroll(state: ClusterState, count: int, timeout: float, say) -> None:
    """Record the running hosts the way ``hybridray attach`` records a cluster an operator
    runs: probe the head's GCS from the operator's side (TCP, then mutual TLS with the
    head's certificate, which names its IP), wait for its dashboard, admit the nodes the
    scripts started (each must carry labels that fit the topology), report any other live
    node as drift, save the record and mirror it into the cluster's KV for the workers'
    guard. One record shape however the cluster came to be; ``down`` still owns the hosts."""
    from hybridray.cluster import attachment

    attachment.probe(state.address, state.tls)
    if state.dashboard_url:
        _wait_dashboard(state, timeout)
    result = attachment.enroll(state, state.topology(), wait_nodes=count, wait_s=timeout,
                               node_ids=[n.node_id for n in state.nodes if n.node_id],
                               how="up")
    say(f"  recorded as attach records a cluster: GCS {state.address} answers over mutual "
        f"TLS, dashboard {state.dashboard_url or 'off'}, {len(state.members)} member node(s) "
        f"whose labels fit the topology, {len(result.drift)} drift")
    attachment.report(state, result, "up", say, list_members=False, hosts="netns",
                      dashboard=state.dashboard_url, tls=True)


def _wait_dashboard(state: ClusterState, timeout: float) -> None:
    """Until the head's dashboard (and Jobs API) answers with the cluster's token."""
    from hybridray.cluster import attachment

    url = state.dashboard_url
    host = state.address.rsplit(":", 1)[0]
    deadline = time.monotonic() + timeout
    while True:
        try:
            attachment.check_dashboard(url, host, Path(state.token_path))
            return
        except ClusterError:
            if time.monotonic() > deadline or not state.head.alive():
                raise
        time.sleep(0.5)


def _failure(state: ClusterState, key: str, why: str) -> ClusterError:
    from hybridray.cluster.startup import log_tail

    node = next(n for n in state.nodes if n.key == key)
    return ClusterError(f"namespace cluster {state.name!r}: node {key} {why}; last lines of "
                        f"{node.log}:\n{log_tail(node.log)}")


def _start_storage(state: ClusterState, topology: Topology, rec: netns.NetRecord,
                   simulate: bool, say) -> None:
    """The S3 server of each emulated site, inside that site's first host (cut with it)."""
    from hybridray.storage import emulator, s3server

    sites = emulator.emulated_sites(topology, simulate=True)
    for site in sites:
        if not rec.site_hosts(site):
            say(f"  {'s3 storage':<14} {site:<14} not started: the site has no host to run on")
            continue
        host = rec.site_hosts(site)[0]
        bucket = topology.sites[site].storage.path.split("/", 1)[0]
        server = s3server.start(log=state.state_dir / "logs" / f"s3-{site}.log",
                                buckets=[bucket], host=host.ip, netns=host.netns)
        state.services[f"{emulator.SERVICE}-{site}"] = server.to_json()
        state.overrides.append(f"sites.{site}.storage.endpoint={server.endpoint}")
        state.topology_snapshot["sites"][site]["storage"]["endpoint"] = server.endpoint
        say(f"  {'s3 storage':<14} {site:<14} pid {server.pid:<8} {server.endpoint} "
            f"(in {host.netns})")
    save_state(state)


# ---- stopping -----------------------------------------------------------------------------

def stop(state: ClusterState) -> list[str]:
    """After the node processes are stopped: what still runs in the namespaces, the S3
    servers, then every namespace, link and qdisc the record lists."""
    from hybridray.storage import s3server

    for key, record in list(state.services.items()):
        if key.startswith("s3-"):
            s3server.stop(s3server.S3Server.from_json(record))
    shutil.rmtree(state.state_dir / "secrets", ignore_errors=True)  # CA keys: gone with it
    if not state.netns:
        return []
    rec = netns.NetRecord.from_json(state.netns)
    for _ in range(3):  # stragglers in our namespaces were started there by us
        pids = netns.ns_pids(rec)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, 9)
        time.sleep(0.3)
    return netns.teardown(rec)


def _remove_orphans(prefix: str, say) -> None:
    """Objects with this cluster's prefix but no record: a run killed before it saved."""
    left = netns.inventory(prefix)
    if not (left["netns"] or left["links"]):
        return
    rec = netns.NetRecord(prefix=prefix, subnet="", gateway="", wan_bridge="")
    rec.made = ([{"kind": "link", "name": n} for n in left["links"]]
                + [{"kind": "netns", "name": n} for n in left["netns"]])
    rec.hosts = [netns.NetHost(key=n, site="", netns=n, ip="", veth="") for n in left["netns"]]
    for pid in netns.ns_pids(rec):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, 9)
    netns.teardown(rec)
    say(f"  removed {len(left['netns'])} namespace(s) and {len(left['links'])} link(s) left "
        f"by an earlier run of this cluster (prefix {prefix})")


# ---- partitions and drivers ---------------------------------------------------------------

def record_of(state: ClusterState) -> netns.NetRecord:
    if not state.netns:
        raise NetnsError(f"cluster {state.name!r} does not run on namespace hosts; fault "
                         f"drills need one started with hybridray up FILE --hosts netns")
    return netns.NetRecord.from_json(state.netns)


def head_namespace(state: ClusterState) -> str:
    return record_of(state).host("head").netns


def in_namespace(name: str) -> bool:
    """True if this process runs in network namespace ``name``."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return False


def driver_argv(state: ClusterState, argv: list[str]) -> list[str]:
    """``argv`` run in the head's namespace (``ip netns exec``), as a driver on the head."""
    return ["ip", "netns", "exec", head_namespace(state), *argv]


#: set by the ``hybridray`` command: a driver command then moves itself onto the head host
REEXEC_CLI = False


def driver_host(state: ClusterState) -> netns.NetHost:
    """The host this process runs on, for a Ray driver of a namespace cluster.

    A driver needs a raylet on its own host, so it runs in one of the cluster's namespaces
    (a job's entrypoint runs wherever Ray put it; scripts usually run on the head). The
    ``hybridray`` command, started elsewhere, re-runs itself in the head's namespace
    (``ip netns exec``; this never returns); any other process is told how to get there.

    Raises:
        NetnsError: this process runs on none of the cluster's hosts.
    """
    rec = record_of(state)
    for host in rec.hosts:
        if in_namespace(host.netns):
            return host
    ns = rec.host("head").netns
    if REEXEC_CLI and os.geteuid() == 0:
        argv = driver_argv(state, [sys.executable, "-m", "hybridray", *sys.argv[1:]])
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(argv[0], argv)
    raise NetnsError(f"cluster {state.name!r} runs on namespace hosts, and a Ray driver runs "
                     f"on a host of the cluster: run this script on the head host, e.g. "
                     f"ip netns exec {ns} python SCRIPT.py (hybridray commands do this "
                     "themselves), or submit it with ray job submit")
