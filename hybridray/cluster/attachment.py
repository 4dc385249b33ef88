"""``attach``/``detach``: record a cluster hybridray did not start, and forget it again.

A cluster an operator runs (the rendered join scripts, ``ray up``, KubeRay, plain
``ray start``) gets the same record ``hybridray up`` writes: address, token path, TLS files,
dashboard URL, topology and the member nodes. After that every command and
``hybridray.connect(NAME)`` work against it exactly as against a local cluster, because they
read only the record. What differs: hybridray owns no process of it, so ``down`` refuses
(``detach`` forgets it and leaves it running), and nodes are known from the GCS alone.

Attaching checks, before anything is written, that the cluster can really be reached and
trusted, each failure one line naming the fix: nothing listening at the address, TLS on one
side only, a certificate from another CA or not naming the host, a missing or refused token,
a topology file that does not load, no live node whose labels fit the topology. The live
nodes whose labels fit become the members; the others are drift, reported and never placed
on (``membership.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hybridray.cluster import membership, mirror
from hybridray.cluster.gcs import GcsView, split_address
from hybridray.cluster.roots import check_storage_is_own, claim_storage
from hybridray.cluster.state import (
    ORIGIN_ATTACH,
    ClusterState,
    cluster_dir,
    cluster_lock,
    hybridray_home,
    list_clusters,
    load_state,
    now_iso,
    save_state,
)
from hybridray.exceptions import ClusterError, ClusterNotFound, ConfigError
from hybridray.topology.models import Topology

DEFAULT_SECRETS = "secrets"        # where `hybridray certs --out secrets/` writes
DEFAULT_DASHBOARD_PORT = 8265
PROBE_TIMEOUT_S = 5.0
GCS_TIMEOUT_S = 10.0

Say = Callable[[str], None]


def tls_from_dir(directory: str | os.PathLike, host: str | None = None) -> dict[str, str]:
    """Ray's TLS variables from a ``hybridray certs`` directory: what nodes trust
    (``trust.pem``, or ``ca.crt`` in a directory without site CAs) and the certificate this
    machine presents: ``nodes/HOST.crt`` for ``host``, else this machine's host name (issued
    with ``hybridray certs ... --host $(hostname)``), else one ``hybridray certs`` issued for a
    ``provider: local`` site (``local-SITE``, or ``local``) on this machine.

    Raises:
        ClusterError: no CA, or no certificate for this machine (naming the ones there).
    """
    d = Path(directory).expanduser().absolute()
    trust = d / "trust.pem" if (d / "trust.pem").is_file() else d / "ca.crt"
    if not trust.is_file():
        raise ClusterError(f"{d} holds no trust.pem or ca.crt; give the directory hybridray "
                           "certs wrote (--tls-dir DIR), or --no-tls for a cluster without TLS")
    nodes = d / "nodes"
    have = sorted(p.stem for p in nodes.glob("*.crt")) if nodes.is_dir() else []
    names = [host] if host else [socket.gethostname(), socket.getfqdn(), "local",
                                 *(n for n in have if n.startswith("local-"))]
    for name in dict.fromkeys(n for n in names if n):
        cert, key = nodes / f"{name}.crt", nodes / f"{name}.key"
        if cert.is_file() and key.is_file():
            from hybridray.deploy.certs import NodeCert, check_node_cert

            node = NodeCert(cert=cert, key=key, ca=trust)
            check_node_cert(node)
            return node.env()
    looked = ", ".join(f"{n}.crt" for n in dict.fromkeys(x for x in names if x))
    raise ClusterError(
        f"{nodes} has no certificate for this machine (looked for {looked}; there: "
        f"{', '.join(have) or 'none'}); issue one with hybridray certs FILE --out {d} "
        f"--host {socket.gethostname()}, or pick one with --tls-host NAME")


def attach(name: str, address: str, topology: Topology | str | os.PathLike, *,
           overrides: list[str] | tuple[str, ...] = (),
           token_path: str | os.PathLike | None = None,
           tls: dict[str, str] | str | os.PathLike | None = None,
           dashboard_url: str | None = None, probe_dashboard: bool = True,
           wait_nodes: int = 0, wait_s: float = 120.0,
           home: str | os.PathLike | None = None, say: Say = lambda line: None
           ) -> ClusterState:
    """Record a running cluster hybridray did not start, under ``name``.

    Args:
        name: the record's name (the topology is renamed to it).
        address: the head's GCS, ``HOST:PORT``.
        topology: a cluster file (with ``overrides``) or a ``Topology``.
        token_path: the cluster's Ray auth token (default ``secrets/token``).
        tls: Ray's TLS variables (``RAY_TLS_SERVER_CERT``/``_KEY``/``_CA_CERT``), or a
            ``hybridray certs`` directory to take them from (``tls_from_dir``); None: no TLS.
        dashboard_url: the dashboard / Jobs API (``http://HOST:8265``). None: use
            ``http://HOST:8265`` if a Ray dashboard answers there, else record none.
        probe_dashboard: with ``dashboard_url`` None, look for one at all.
        wait_nodes: wait (up to ``wait_s``) until at least this many nodes are alive before
            deciding who the members are: nodes that register later are drift until admitted.
            A ``dashboard_url`` given with it is waited for too (a head just started opens
            its dashboard seconds after its GCS).
        home: the hybridray home. ``say``: called with one line per finding.

    Returns:
        The record, with the live nodes whose labels fit the topology as members.

    Raises:
        ConfigError: the topology file does not load (every problem named).
        ClusterError: the address, TLS, token or dashboard do not work (one line each, with
            the fix), no live node fits the topology, or ``name`` is already recorded.
    """
    cluster_dir(name, home)                         # a valid name, before any probing
    topo = _topology(name, topology, overrides)
    token = _token(token_path)
    tls_env = tls_from_dir(tls) if isinstance(tls, (str, os.PathLike)) else dict(tls or {})
    host = _split(address)[0]
    _refuse_existing(name, home)
    # its storage is its own, as for `up`: no root another recorded or owning cluster uses
    check_storage_is_own(topo, hybridray_home(home).expanduser().absolute())
    probe(address, tls_env)
    deadline = time.monotonic() + (wait_s if wait_nodes else 0)
    url = _dashboard(dashboard_url, host, token, probe_dashboard, say, until=deadline)

    home_path = hybridray_home(home).expanduser().absolute()
    state = ClusterState(
        name=name, address=address, token_path=str(token), temp_dir="", home=str(home_path),
        ports={}, dashboard=url is not None, dashboard_address=url,
        source_file=str(Path(topology).absolute()) if isinstance(topology, (str, os.PathLike))
        else None, overrides=[*overrides, f"name={name}"] if not isinstance(topology, Topology)
        else [], topology_snapshot=topo.model_dump(mode="json"), created_at=now_iso(),
        tls={k: v if k == "RAY_USE_TLS" else str(Path(v).absolute())
             for k, v in tls_env.items()},
        origin=ORIGIN_ATTACH)
    with cluster_lock(name, home_path, wait=True):
        _refuse_existing(name, home_path)
        result = enroll(state, topo, wait_nodes=wait_nodes,
                        wait_s=max(0.0, deadline - time.monotonic()), how="attach")
        claim_storage(topo, home_path, existing_only=True)
    sites = sorted({m.site for m in state.members})
    say(f"attached {name!r} at {address}: {len(state.members)} member node(s) at "
        f"{', '.join(sites)}; dashboard {url or 'none'}; TLS {'on' if tls_env else 'off'}")
    report(state, result, "attach", say, dashboard=url, tls=bool(tls_env))
    for site_name, site in topo.sites.items():
        root = site.storage.root
        if root.startswith("file://") and not Path(root[len("file://"):]).is_dir():
            say(f"  note: site {site_name}'s storage root {root} is not on this machine; "
                "sync and ls read and commit from here, so mount it at the same path (or "
                "use s3:// or gs://)")
    return state


def probe(address: str, tls: dict[str, str]) -> None:
    """Check from this machine that a GCS answers at ``address`` and speaks TLS exactly when
    ``tls`` is given, trusting its certificate and trusted by it (one line per failure)."""
    host, port = _split(address)
    _probe_tcp(address, host, port)
    _probe_tls(address, host, port, tls)


def _split(address: str) -> tuple[str, int]:
    try:
        return split_address(address)
    except ValueError:
        raise ClusterError(f"--address {address!r}: give the head's GCS as HOST:PORT, e.g. "
                           "10.20.0.5:6379") from None


def enroll(state: ClusterState, topology: Topology, *, wait_nodes: int = 0,
           wait_s: float = 120.0, node_ids: list[str] | None = None,
           how: str = "attach") -> membership.Admission:
    """Record who belongs to the running cluster ``state`` describes, and publish the record:
    the one path by which ``attach`` and ``up --hosts netns`` write a cluster record.

    Waits (up to ``wait_s``) for ``wait_nodes`` live nodes, admits the live nodes whose labels
    fit ``topology`` (``node_ids``: exactly those nodes, each of which must fit), saves
    ``state`` and mirrors it into the cluster's KV for the workers' guard. Every other live
    node is drift (``Admission.drift``). The caller holds the cluster's lock.

    Raises:
        ClusterError: the GCS refuses the token or cannot be read, too few nodes come up, no
            node fits (or one of ``node_ids`` does not), or the KV cannot be written; then
            nothing new is recorded.
    """
    address = state.address
    with _gcs(state) as view:
        nodes = _wait_for(view, wait_nodes, wait_s, address)
        result = membership.admit(state, topology, nodes, node_ids=node_ids, how=how,
                                  first=not state.members)
        if node_ids is not None and result.refused:
            bad = result.refused[0]
            raise ClusterError(f"node {bad.key or bad.node_id[:12]} at {address} was started "
                               f"with labels that do not fit topology {topology.name!r} "
                               f"({bad.why}); fix the labels its start script gives it")
        if not result.admitted and not state.members:
            raise ClusterError(_no_fit(topology, nodes, result.drift, address))
        try:
            mirror.publish(view, state, topology)
        except Exception as e:
            raise ClusterError(f"cannot write hybridray's record into the cluster's KV "
                               f"({type(e).__name__}: {e}); nothing was recorded") from None
        cluster_dir(state.name, state.home).mkdir(parents=True, exist_ok=True, mode=0o700)
        save_state(state)
    return result


def report(state: ClusterState, result: membership.Admission, event: str, say: Say, *,
           list_members: bool = True, **fields: Any) -> None:
    """Audit what ``enroll`` recorded (``event``: ``attach`` or ``up``) and say it: each
    member (``list_members``), and each drift node with the reasons it is never placed on."""
    audit = _audit(state)
    audit.record(event, cluster=state.name, address=state.address,
                 members=len(state.members), drift=len(result.drift), **fields)
    for m in state.members if list_members else ():
        say(f"  member {m.node_id[:12]}  {m.site:<10} {m.key or m.pool or ''}")
    if result.drift:
        audit.record("drift", cluster=state.name, action="reported",
                     nodes=[d.to_json() for d in result.drift])
        for d in result.drift:
            say(f"  DRIFT  {d.node_id[:12]}  site {d.site or '?'}: {d.why}; never placed on")


def detach(name: str, *, home: str | os.PathLike | None = None) -> ClusterState:
    """Forget attached cluster ``name``: its record (and the record's copy in the cluster's
    KV, best effort). The cluster and its work keep running; the audit log stays.

    Raises:
        ClusterNotFound: nothing recorded under ``name``.
        ClusterError: ``name`` was started by ``hybridray up`` (stop it with ``down``).
    """
    with cluster_lock(name, home, wait=True):
        state = load_state(name, home=home)
        if not state.attached:
            raise ClusterError(f"cluster {name!r} was started by hybridray up; stop it with "
                               f"hybridray down {name} (detach forgets attached clusters)")
        try:
            from hybridray.cluster.gcs import reachable

            if reachable(state.address, 2.0):
                with GcsView(state.address, state.token_path, state.tls) as view:
                    mirror.drain_events(view, _audit(state), name)
                    view.kv_del(f"{mirror.RECORD_PREFIX}{name}")
        except Exception:
            pass   # unreachable or refused: forgetting it here is what was asked
        import shutil

        shutil.rmtree(cluster_dir(name, home), ignore_errors=True)
        _audit(state).record("detach", cluster=name, address=state.address)
        return state


# ---- checks -------------------------------------------------------------------------------

def _audit(state: ClusterState):
    from hybridray.audit import AuditLog

    return AuditLog.for_cluster(state.name, state.home)


def _topology(name: str, topology: Topology | str | os.PathLike,
              overrides: list[str] | tuple[str, ...]) -> Topology:
    if isinstance(topology, Topology):
        return Topology.model_validate({**topology.model_dump(mode="json"), "name": name})
    from hybridray.topology import load_topology

    return load_topology(topology, [*overrides, f"name={name}"])


def _token(token_path: str | os.PathLike | None) -> Path:
    path = Path(token_path or Path(DEFAULT_SECRETS) / "token").expanduser().absolute()
    given = "--token-file" if token_path else f"the default {DEFAULT_SECRETS}/token"
    if not path.is_file():
        raise ClusterError(f"token file {path} ({given}) does not exist; give the cluster's "
                           "Ray auth token with --token-file FILE (hybridray certs writes "
                           "DIR/token)")
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise ClusterError(f"cannot read token file {path}: {e.strerror}") from None
    if not text:
        raise ClusterError(f"token file {path} is empty; give the cluster's Ray auth token")
    return path


def _refuse_existing(name: str, home: str | os.PathLike | None) -> None:
    try:
        old = load_state(name, home=home)
    except ClusterNotFound:
        return
    if old.attached:
        raise ClusterError(f"{name!r} is already attached (GCS {old.address}); hybridray "
                           f"detach {name} first, or take in new nodes with hybridray admit "
                           f"{name}")
    raise ClusterError(f"{name!r} is a cluster hybridray up started (GCS {old.address}); "
                       "attach under another name")


def _probe_tcp(address: str, host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return
    except socket.gaierror:
        raise ClusterError(f"--address {address}: cannot resolve host {host!r}; give the "
                           "head's IP or a name this machine resolves") from None
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ClusterError(f"nothing answers at {address} ({why}); check the address (the "
                           "head's GCS port, 6379 unless changed), that the head runs, and "
                           "that this machine may reach it") from None


def _probe_tls(address: str, host: str, port: int, tls: dict[str, str]) -> None:
    """Tell "TLS on one side only" and "certificate not trusted" apart before Ray would
    report either as a time-out."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2"])
    if tls:
        ctx.load_verify_locations(tls["RAY_TLS_CA_CERT"])
        # trust.pem holds site intermediates, not the root: gRPC accepts them as anchors
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.load_cert_chain(tls["RAY_TLS_SERVER_CERT"], tls["RAY_TLS_SERVER_KEY"])
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as conn:
            conn.settimeout(1.0)
            try:
                conn.recv(1)          # a TLS 1.3 server rejects a client certificate here
            except TimeoutError:
                pass
        speaks_tls, error = True, None
    except ssl.SSLCertVerificationError as e:
        speaks_tls, error = True, e
    except ssl.SSLError as e:
        speaks_tls, error = "alert" in str(e).lower(), e
    except OSError as e:                # EOF or reset: a plaintext server hung up
        speaks_tls, error = False, e
    if not tls:
        if speaks_tls:
            raise ClusterError(f"the GCS at {address} runs TLS; give --tls-dir DIR (what "
                               "hybridray certs wrote: trust.pem and this machine's "
                               "certificate)")
        return
    if not speaks_tls:
        raise ClusterError(f"the GCS at {address} does not run TLS, but TLS files were given "
                           f"({tls['RAY_TLS_CA_CERT']}); attach with --no-tls, or turn TLS on "
                           "for the cluster")
    if isinstance(error, ssl.SSLCertVerificationError):
        if "hostname" in str(error).lower() or "ip address mismatch" in str(error).lower():
            raise ClusterError(f"the GCS's certificate does not name {host}; dial the head by a "
                               "name or IP its certificate carries, or reissue it with "
                               f"hybridray certs ... --head-address {host}")
        raise ClusterError(f"the GCS at {address} presents a certificate not signed by "
                           f"{tls['RAY_TLS_CA_CERT']}; give the --tls-dir of this cluster's CA")
    if error is not None:
        raise ClusterError(f"the GCS at {address} refused this machine's certificate "
                           f"{tls['RAY_TLS_SERVER_CERT']} ({_first_line(error)}); it must be "
                           "signed by the cluster's CA: issue one with hybridray certs "
                           "FILE --out DIR --host $(hostname)")


def check_dashboard(url: str, host: str, token: Path) -> str:
    """``url`` when a Ray dashboard answers there and accepts ``token``; else ClusterError."""
    return _dashboard(url, host, token, True, lambda line: None) or url


def _dashboard(url: str | None, host: str, token: Path, probe: bool, say: Say,
               until: float = 0.0) -> str | None:
    """The dashboard's URL if one answers; a given ``url`` that is not up yet (refused, or
    HTTP 5xx) is asked again each second until the ``until`` monotonic deadline."""
    explicit = url is not None
    if not explicit:
        if not probe:
            return None
        url = f"http://{host}:{DEFAULT_DASHBOARD_PORT}"
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ClusterError(f"--dashboard {url}: give the dashboard's URL, e.g. "
                           f"http://{host}:{DEFAULT_DASHBOARD_PORT}")
    req = urllib.request.Request(f"{url}/api/version", headers={
        "Authorization": f"Bearer {token.read_text().strip()}"})
    while True:
        try:
            with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S) as resp:
                body = json.loads(resp.read() or b"{}")
            if "ray_version" not in body:
                raise ValueError("not a Ray dashboard")
            return url
        except urllib.error.HTTPError as e:
            why = ("it refused the token" if e.code in (401, 403) else f"HTTP {e.code}")
            not_up = e.code >= 500
        except (OSError, ValueError) as e:
            why = _first_line(getattr(e, "reason", e))
            not_up = isinstance(e, OSError)
        if not (explicit and not_up and time.monotonic() < until):
            break
        time.sleep(1)
    if explicit:
        raise ClusterError(f"--dashboard {url}: no Ray dashboard answers ({why}); give its "
                           "URL (ray start --dashboard-host/--dashboard-port), or leave "
                           "--dashboard out to attach without one (no hybridray submit)")
    say(f"  no dashboard at {url} ({why}): attached without one; hybridray submit needs it "
        "(--dashboard URL)")
    return None


class _gcs:
    """``GcsView`` whose failures read as one line: a refused token above all."""

    def __init__(self, state: ClusterState):
        self.state = state
        self.view = GcsView(state.address, state.token_path, state.tls)

    def __enter__(self) -> GcsView:
        try:
            with _stderr_to_devnull():   # Ray's C++ client logs its own warning line first
                view = self.view.__enter__()
                view.nodes(timeout=GCS_TIMEOUT_S)
            return view
        except Exception as e:
            self.view.__exit__(None, None, None)
            raise self._explain(e) from None

    def __exit__(self, *exc: Any) -> None:
        self.view.__exit__(*exc)

    def _explain(self, e: BaseException) -> ClusterError:
        text = f"{type(e).__name__}: {e}"
        if "InvalidAuthToken" in text or "Unauthenticated" in text or \
                type(e).__name__ == "AuthenticationError":
            return ClusterError(f"the GCS at {self.state.address} refused the token in "
                                f"{self.state.token_path} (InvalidAuthToken); give the "
                                "cluster's own token with --token-file FILE")
        return ClusterError(f"cannot talk to the GCS at {self.state.address} "
                            f"({_first_line(text)}); is it a Ray head's GCS port?")


def _wait_for(view: GcsView, count: int, wait_s: float, address: str) -> list:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = view.nodes(timeout=GCS_TIMEOUT_S)
        alive = sum(n.alive for n in nodes)
        if alive >= count:
            return nodes
        if time.monotonic() > deadline:
            raise ClusterError(f"only {alive} of the {count} nodes asked for (--wait-nodes) are "
                               f"alive at {address} after {wait_s:.0f}s; check the nodes' "
                               "logs, or attach with fewer and admit the rest later")
        time.sleep(1)


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Silence file descriptor 2 (C++ logging bypasses ``sys.stderr``) for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _no_fit(topo: Topology, nodes: list, drift: list, address: str) -> str:
    alive = [n for n in nodes if n.alive]
    first = "; ".join(f"{d.node_id[:12]}: {d.why}" for d in drift[:3])
    return (f"none of the {len(alive)} live node(s) at {address} carries labels that fit "
            f"topology {topo.name!r} ({first}); attach with the topology the nodes were "
            "started from (hybridray.io/site and max-data-class labels by hybridray render or "
            "hybridray.labels.node_labels)")


def _first_line(e: Any) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def attached_names(home: str | os.PathLike | None = None) -> list[str]:
    """Names of the attached clusters recorded under ``home``."""
    out = []
    for n in list_clusters(home):
        try:
            if load_state(n, home=home).attached:
                out.append(n)
        except (ClusterNotFound, ClusterError, ConfigError):
            continue
    return out
