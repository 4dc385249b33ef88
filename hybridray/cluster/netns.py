"""Sites as hosts on one machine: a network namespace per node, bridges, shaped WAN links.

``hybridray up FILE --hosts netns`` rehearses a deployment: each node runs in a Linux network
namespace of its own (its own address, its own ports: the rendered scripts pin Ray's ports,
so two nodes could never share one), and sites are joined the way real sites are, through a
WAN whose links have the declared bandwidth. The layout is a star with no loops::

    host ns ──veth──┐                                   ┌──veth── host ns
    host ns ──veth──┤ site bridge ──uplink── WAN bridge ├ ... (one uplink per site)
                                   (root ns: .1)

One subnet (a /24 that no address or route of this machine touches) holds every address;
each site owns an aligned block of it, so a ``tc`` u32 filter can tell a packet's destination
site from its address. A site's outbound traffic leaves through its uplink only, so an HTB
class per destination site on that uplink's egress shapes the site pair's aggregate in that
direction (the other direction is the other site's uplink). Latency needs the netem qdisc;
where the kernel lacks it (``Specified qdisc kind is unknown``), links carry bandwidth only,
and the record says so. ``partition`` takes a site's uplink down (the site keeps talking to
itself, nobody else reaches it); ``heal`` brings it back.

Every name carries a prefix made from the cluster name and its hybridray home, and every
object is recorded *before* it is made, so ``teardown`` (from ``down``, a failed ``up``, or a
later ``up`` after a crash) removes exactly what was made, and two clusters never collide.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hybridray.exceptions import NetnsError

#: where hybridray looks for a free /24: 10.213.0.0/24 ... 10.213.255.0/24
SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")
SITE_BLOCK = 32            # addresses per site block: up to 29 hosts per site
MAX_SITES = 256 // SITE_BLOCK - 1   # block 0 holds the root namespace's gateway address
UNSHAPED = "10gbit"        # rate of the default class (traffic inside a site, to the gateway)
ALLOC_LOCK = "/tmp/hybridray-netns.lock"


@dataclass
class NetHost:
    """One node as a host: its namespace, address and the root-side end of its veth."""

    key: str
    site: str
    netns: str
    ip: str
    veth: str


@dataclass
class NetLink:
    """One shaped direction: traffic from ``src`` to ``dst`` leaves ``src``'s uplink here."""

    src: str
    dst: str
    mbps: float
    latency_ms: float
    classid: str
    dev: str
    latency_applied: bool = False


@dataclass
class NetRecord:
    """Everything a namespace cluster made, recorded as it is made (``state.netns``)."""

    prefix: str
    subnet: str
    gateway: str
    wan_bridge: str
    site_bridges: dict[str, str] = field(default_factory=dict)
    site_blocks: dict[str, str] = field(default_factory=dict)
    uplinks: dict[str, list[str]] = field(default_factory=dict)  # site -> [site end, WAN end]
    hosts: list[NetHost] = field(default_factory=list)
    links: list[NetLink] = field(default_factory=list)
    netem: bool = False
    partitioned: list[str] = field(default_factory=list)
    made: list[dict[str, str]] = field(default_factory=list)    # {"kind": netns|link, "name"}

    def host(self, key: str) -> NetHost:
        return next(h for h in self.hosts if h.key == key)

    def site_hosts(self, site: str) -> list[NetHost]:
        return [h for h in self.hosts if h.site == site]

    def link(self, src: str, dst: str) -> NetLink | None:
        return next((lk for lk in self.links if lk.src == src and lk.dst == dst), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetRecord:
        data = dict(data)
        hosts = [NetHost(**h) for h in data.pop("hosts", [])]
        links = [NetLink(**lk) for lk in data.pop("links", [])]
        return cls(**data, hosts=hosts, links=links)


# ---- can this machine do it? ----------------------------------------------------------------

def unsupported_reason() -> str | None:
    """Why namespace clusters cannot run here (one line), or None when they can."""
    if not Path("/proc/self/ns/net").exists():
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return ("namespace hosts need root (they create network namespaces, veth pairs, "
                "bridges and tc qdiscs); run as root, e.g. sudo -E hybridray up FILE "
                "--hosts netns")
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"the {tool} command is missing; install {package}"
    return None


def require_support() -> None:
    reason = unsupported_reason()
    if reason:
        raise NetnsError(reason)


def prefix_for(cluster: str, home: str | os.PathLike) -> str:
    """``hr`` + 5 hex digits of (home, name): short enough for 15-byte interface names."""
    digest = hashlib.sha1(f"{Path(home).absolute()}\0{cluster}".encode()).hexdigest()
    return f"hr{digest[:5]}"


# ---- running ip and tc --------------------------------------------------------------------

#: the namespace that owns the bridges and links, once this process moved to a host (``enter``)
_OPERATOR_NS: int | None = None
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


def enter(name: str) -> None:
    """Move this thread (and the threads it starts from now on) into namespace ``name``,
    keeping a handle on the one it leaves: ``run`` still makes and cuts links there.

    A driver that also runs the drills (the demo) uses it: Ray's threads, started after
    this, live on the host; ``ip``/``tc`` commands run where the links are.
    """
    global _OPERATOR_NS
    if _OPERATOR_NS is None:
        _OPERATOR_NS = os.open("/proc/self/ns/net", os.O_RDONLY)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def leave() -> None:
    """Back to the namespace ``enter`` left (this thread)."""
    global _OPERATOR_NS
    if _OPERATOR_NS is not None:
        _setns(_OPERATOR_NS)
        os.close(_OPERATOR_NS)
        _OPERATOR_NS = None


def _to_operator() -> None:  # in the child, before exec
    if _OPERATOR_NS is not None:
        _setns(_OPERATOR_NS)


def run(*args: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess:
    """Run ``ip``/``tc`` (inside ``netns`` when given); a failure names the command."""
    cmd = ["ip", "netns", "exec", netns, *args] if netns else list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          preexec_fn=_to_operator if _OPERATOR_NS is not None else None)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _json(*args: str) -> list[dict[str, Any]]:
    out = run(*args).stdout.strip()
    return json.loads(out) if out else []


def netns_names() -> list[str]:
    return [n["name"] for n in _json("ip", "-j", "netns", "list")]


def link_names() -> list[str]:
    return [n["ifname"] for n in _json("ip", "-j", "link", "show")]


def qdiscs() -> list[tuple[str, str, str]]:
    """``(device, kind, handle)`` of every qdisc in the root namespace."""
    return [(q.get("dev", ""), q.get("kind", ""), q.get("handle", ""))
            for q in _json("tc", "-j", "qdisc", "show")]


def inventory(prefix: str) -> dict[str, list]:
    """What exists now under ``prefix``: namespaces, links and qdiscs on those links."""
    links = [n for n in link_names() if n.startswith(prefix)]
    return {"netns": sorted(n for n in netns_names() if n.startswith(prefix + "-")),
            "links": sorted(links),
            "qdiscs": sorted(q for q in qdiscs() if q[0] in links and q[1] != "noqueue")}


# ---- choosing addresses -------------------------------------------------------------------

def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for entry in _json("ip", "-j", "-4", "addr", "show"):
        for a in entry.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for route in _json("ip", "-j", "-4", "route", "show", "table", "all"):
        dst = route.get("dst", "")
        if dst and dst != "default" and not dst.startswith(("broadcast", "local")):
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(dst, strict=False))
    return used


def free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of ``SUBNET_POOL`` that no address or route of this machine overlaps."""
    used = _used_networks()
    for net in SUBNET_POOL.subnets(new_prefix=24):
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise NetnsError(f"every /24 of {SUBNET_POOL} is in use on this machine; bring a "
                     "namespace cluster down (hybridray down NAME) and retry")


@contextlib.contextmanager
def allocation_lock() -> Iterator[None]:
    """Two ``up``s at once must not pick the same subnet before either has claimed it."""
    fd = os.open(ALLOC_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def plan(prefix: str, subnet: ipaddress.IPv4Network, sites: list[str],
         nodes: list[tuple[str, str]]) -> NetRecord:
    """Names and addresses for ``nodes`` (``(key, site)``, head first); nothing is made.

    Raises:
        NetnsError: more sites or hosts per site than the /24 has blocks for.
    """
    if len(sites) > MAX_SITES:
        raise NetnsError(f"a namespace cluster holds at most {MAX_SITES} sites "
                         f"(this one has {len(sites)})")
    hosts_of = {s: [k for k, site in nodes if site == s] for s in sites}
    crowded = {s: len(k) for s, k in hosts_of.items() if len(k) > SITE_BLOCK - 3}
    if crowded:
        raise NetnsError(f"a namespace cluster holds at most {SITE_BLOCK - 3} nodes per site "
                         f"({', '.join(f'{s}: {n}' for s, n in crowded.items())}); lower the "
                         "pools' count or min")
    base = int(subnet.network_address)
    rec = NetRecord(prefix=prefix, subnet=str(subnet),
                    gateway=str(ipaddress.ip_address(base + 1)), wan_bridge=f"{prefix}w")
    n = 0
    for i, site in enumerate(sites, start=1):
        block = ipaddress.ip_network(f"{ipaddress.ip_address(base + i * SITE_BLOCK)}/"
                                     f"{32 - (SITE_BLOCK - 1).bit_length()}")
        rec.site_blocks[site] = str(block)
        rec.site_bridges[site] = f"{prefix}b{i}"
        rec.uplinks[site] = [f"{prefix}u{i}s", f"{prefix}u{i}w"]
        for j, key in enumerate(hosts_of[site]):
            ns_key = key.replace(".", "-")
            rec.hosts.append(NetHost(
                key=key, site=site, netns=f"{prefix}-{ns_key}",
                ip=str(ipaddress.ip_address(int(block.network_address) + 2 + j)),
                veth=f"{prefix}h{n}"))
            n += 1
    return rec


# ---- making and removing ------------------------------------------------------------------

class Builder:
    """Makes a planned network, recording each object (``save``) before it is made."""

    def __init__(self, rec: NetRecord, save=lambda: None):
        self.rec = rec
        self.save = save

    def _made(self, kind: str, name: str) -> None:
        self.rec.made.append({"kind": kind, "name": name})
        self.save()

    def build(self) -> None:
        rec = self.rec
        prefixlen = ipaddress.ip_network(rec.subnet).prefixlen
        self._bridge(rec.wan_bridge)
        run("ip", "addr", "add", f"{rec.gateway}/{prefixlen}", "dev", rec.wan_bridge)
        for site, bridge in rec.site_bridges.items():
            self._bridge(bridge)
            site_end, wan_end = rec.uplinks[site]
            self._made("link", site_end)
            run("ip", "link", "add", site_end, "type", "veth", "peer", "name", wan_end)
            run("ip", "link", "set", site_end, "master", bridge, "up")
            run("ip", "link", "set", wan_end, "master", rec.wan_bridge, "up")
        for host in rec.hosts:
            self._made("netns", host.netns)
            run("ip", "netns", "add", host.netns)
            self._made("link", host.veth)
            run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
                "netns", host.netns)
            run("ip", "link", "set", host.veth, "master", rec.site_bridges[host.site], "up")
            run("ip", "link", "set", "lo", "up", netns=host.netns)
            run("ip", "addr", "add", f"{host.ip}/{prefixlen}", "dev", "eth0", netns=host.netns)
            run("ip", "link", "set", "eth0", "up", netns=host.netns)
            run("ip", "route", "add", "default", "via", rec.gateway, netns=host.netns)

    def _bridge(self, name: str) -> None:
        self._made("link", name)
        run("ip", "link", "add", name, "type", "bridge")
        # no STP delay: a port forwards as soon as it is up (the layout has no loops)
        run("ip", "link", "set", name, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        run("ip", "link", "set", name, "up")


def teardown(rec: NetRecord) -> list[str]:
    """Remove every namespace and link ``rec`` made (what is already gone is skipped).

    Qdiscs and filters live on those links and go with them. Processes still running in a
    namespace keep it alive after its name is removed, so stop them first (``ns_pids``).

    Returns:
        The names removed.
    """
    removed = []
    existing_ns, existing_links = set(netns_names()), set(link_names())
    for item in reversed(rec.made):  # namespaces first takes their eth0 ends with them
        if item["kind"] == "netns" and item["name"] in existing_ns:
            run("ip", "netns", "delete", item["name"], check=False)
            removed.append(item["name"])
    existing_links = set(link_names())
    for item in reversed(rec.made):
        if item["kind"] == "link" and item["name"] in existing_links:
            run("ip", "link", "delete", item["name"], check=False)
            removed.append(item["name"])
    left = inventory(rec.prefix)
    if left["netns"] or left["links"]:
        raise NetnsError(f"could not remove {', '.join(left['netns'] + left['links'])}; "
                         f"remove them by hand (ip netns delete NAME / ip link delete NAME)")
    return removed


def ns_pids(rec: NetRecord) -> list[int]:
    """Processes running inside the record's namespaces (all of them started there by us)."""
    pids: list[int] = []
    existing = set(netns_names())
    for host in rec.hosts:
        if host.netns in existing:
            out = run("ip", "netns", "pids", host.netns, check=False).stdout
            pids += [int(p) for p in out.split() if p.isdigit()]
    return pids


# ---- shaping ------------------------------------------------------------------------------

def _kbit(mbps: float) -> str:
    return f"{max(8, round(mbps * 1000))}kbit"


def _burst(mbps: float) -> str:
    """Enough bucket for a GSO super-packet (64 KiB) and 5 ms of the rate, whichever is more."""
    return f"{max(70_000, int(mbps * 1e6 / 8 * 0.005))}b"


def shape(rec: NetRecord, links: list[tuple[str, str, float, float]]) -> list[str]:
    """HTB on every site uplink: one class per destination site at that link's rate.

    Args:
        links: ``(src, dst, bandwidth_mbps, latency_ms)`` per shaped direction.

    Returns:
        Lines saying what was applied, latency included or plainly not.
    """
    said = []
    blocks = rec.site_blocks
    for site in rec.site_bridges:
        dev = rec.uplinks[site][0]
        run("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
        run("tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
            "rate", UNSHAPED, "quantum", "200000")
    netem = None
    sites = list(rec.site_bridges)
    for src, dst, mbps, latency in links:
        dev = rec.uplinks[src][0]
        classid = f"1:{10 + sites.index(dst)}"
        quantum = str(min(200_000, max(1514, int(mbps * 1e6 / 8 / 10))))
        run("tc", "class", "add", "dev", dev, "parent", "1:", "classid", classid, "htb",
            "rate", _kbit(mbps), "ceil", _kbit(mbps), "burst", _burst(mbps),
            "cburst", _burst(mbps), "quantum", quantum)
        run("tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
            "u32", "match", "ip", "dst", blocks[dst], "flowid", classid)
        link = NetLink(src=src, dst=dst, mbps=mbps, latency_ms=latency, classid=classid,
                       dev=dev)
        if latency > 0 and netem is not False:
            leaf = f"{10 + sites.index(dst)}:"
            proc = run("tc", "qdisc", "add", "dev", dev, "parent", classid, "handle", leaf,
                       "netem", "delay", f"{latency}ms", check=False)
            if proc.returncode == 0:
                netem = link.latency_applied = True
            elif "unknown" in (proc.stderr + proc.stdout).lower():
                netem = False
            else:
                raise NetnsError(f"netem on {dev} failed: {proc.stderr.strip()}")
        rec.links.append(link)
        said.append(f"  link {src} -> {dst}: {mbps:g} Mbit/s"
                    + (f", {latency:g} ms" if link.latency_applied else ""))
    rec.netem = bool(netem)
    if netem is False:
        said.append("  latency NOT applied: this kernel has no netem qdisc (tc says 'Specified "
                    "qdisc kind is unknown'); links carry their bandwidth only")
    return said


def class_bytes(rec: NetRecord, src: str, dst: str) -> int:
    """Bytes sent so far through the ``src -> dst`` class (what ``tc -s class`` counts)."""
    link = rec.link(src, dst)
    if link is None:
        raise NetnsError(f"no shaped link {src} -> {dst} in this cluster")
    # `tc -j class show` prints plain text on iproute2 6.x: read "class htb 1:N ..." blocks
    text = run("tc", "-s", "class", "show", "dev", link.dev).stdout
    for block in re.split(r"\n(?=class )", text):
        head = block.split()
        if len(head) > 2 and head[2] == link.classid:
            sent = re.search(r"Sent (\d+) bytes", block)
            return int(sent.group(1)) if sent else 0
    return 0


# ---- partitions ---------------------------------------------------------------------------

def partition(rec: NetRecord, site: str) -> None:
    """Cut ``site`` off: both ends of its uplink go down; its hosts still reach each other."""
    _check_site(rec, site)
    for dev in rec.uplinks[site]:
        run("ip", "link", "set", dev, "down")
    if site not in rec.partitioned:
        rec.partitioned.append(site)


def heal(rec: NetRecord, site: str) -> None:
    """Bring ``site``'s uplink back up."""
    _check_site(rec, site)
    for dev in rec.uplinks[site]:
        run("ip", "link", "set", dev, "up")
    if site in rec.partitioned:
        rec.partitioned.remove(site)


def _check_site(rec: NetRecord, site: str) -> None:
    if site not in rec.uplinks:
        raise NetnsError(f"no site {site!r} in this namespace cluster (sites: "
                         f"{', '.join(rec.uplinks)})")


# ---- measuring ----------------------------------------------------------------------------

_SINK = """import socket
s = socket.create_server(("0.0.0.0", {port}))
print("ready", flush=True)
c, _ = s.accept()
while c.recv(1 << 20):
    pass
c.sendall(b"done")
c.close()
"""
_SOURCE = """import socket, time
s = socket.create_connection(("{ip}", {port}), timeout={timeout})
block = b"x" * (1 << 20)
t = time.perf_counter()
for _ in range({mib}):
    s.sendall(block)
s.shutdown(socket.SHUT_WR)
assert s.recv(4) == b"done"
print({mib} * 8 * 1.048576 / (time.perf_counter() - t))
"""


def transfer(src_netns: str, dst_netns: str, dst_ip: str, mib: int, *, port: int = 5201,
             timeout: float = 60.0) -> float:
    """Send ``mib`` MiB over one TCP connection between two namespaces; Mbit/s achieved.

    A real transfer, so what a shaped link really lets through can be read off it.

    Raises:
        NetnsError: the transfer did not complete (e.g. the link is cut).
    """
    sink = subprocess.Popen(["ip", "netns", "exec", dst_netns, sys.executable, "-c",
                             _SINK.format(port=port)], stdout=subprocess.PIPE, text=True)
    try:
        if sink.stdout.readline().strip() != "ready":
            raise NetnsError(f"could not listen on {dst_ip}:{port} in {dst_netns}")
        proc = subprocess.run(
            ["ip", "netns", "exec", src_netns, sys.executable, "-c",
             _SOURCE.format(ip=dst_ip, port=port, mib=mib, timeout=timeout)],
            capture_output=True, text=True, timeout=timeout + 30)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise NetnsError(f"transfer {src_netns} -> {dst_ip}:{port} failed: {last}")
        return float(proc.stdout.strip())
    except subprocess.TimeoutExpired:
        raise NetnsError(f"transfer {src_netns} -> {dst_ip}:{port} timed out") from None
    finally:
        sink.kill()
        sink.wait()
