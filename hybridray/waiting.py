"""No silent waits: what work waits for on Ray, where, what holds it, and a deadline.

Ray queues work it cannot place yet without a word. A task or a worker group that needs a CPU
that a Serve replica holds waits forever, and the command that started it prints nothing: a
custom-model training once sat silent for four minutes behind the ``lm`` service. Two things
prevent that, both reading Ray's own state API (``ray.util.state``):

* ``node_usage()``: per node, its site, CPUs and GPUs, what is free, and what holds the rest.
  Actors and placement groups hold resources until someone releases them (*lasting*); running
  tasks end on their own. The placement policy's capacity rule refuses up front work that can
  never fit beside what lasts (``hybridray.placement.policy``), unless the workload asks to
  queue.
* ``waiting(...)``: wraps a blocking call. Once Ray shows work of this driver pending for
  resources for a few seconds, it prints what is pending, where, and what holds that site;
  again every ``REPORT_EVERY_S``; and at the deadline (``$HYBRIDRAY_WAIT_TIMEOUT_S``, the
  commands' ``--wait-timeout``) it stops the wait, as Ctrl-C would, and raises
  ``ResourceWaitTimeout`` with the same facts and the fix.

The state API is served by the Ray dashboard; on a cluster started with ``--no-dashboard`` the
reports say so and give the free CPUs per site only (from the GCS).
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from hybridray import labels as L
from hybridray.exceptions import ConfigError, ResourceWaitTimeout

WAIT_TIMEOUT_ENV = "HYBRIDRAY_WAIT_TIMEOUT_S"
DEFAULT_WAIT_TIMEOUT_S = 600.0
FIRST_REPORT_S = 3.0       # a pending demand younger than this is Ray doing its job
REPORT_EVERY_S = 15.0
POLL_S = 1.0
# Nothing of ours pending for QUIET_AFTER_S: poll every QUIET_POLL_S instead (each poll asks
# the GCS, and with the dashboard the state API, several questions; a training run's ranks
# share the node's cores with whoever answers). A later wait, a restart's, is seen within it.
QUIET_AFTER_S = 10.0
QUIET_POLL_S = 5.0
STATE_TIMEOUT_S = 10
_LIMIT = 10_000


def add_wait_args(p, holders: str) -> None:
    """``--queue`` and ``--wait-timeout`` of a command that may wait for CPUs ``holders``
    hold (``hybridray train``, ``hybridray sync``); ``apply_wait_args`` reads them."""
    p.add_argument("--queue", action="store_true",
                   help=f"wait for CPUs that {holders} hold now instead of being refused")
    p.add_argument("--wait-timeout", type=float, metavar="SECONDS",
                   help="give up waiting for resources after this long (default: "
                        f"${WAIT_TIMEOUT_ENV} or {DEFAULT_WAIT_TIMEOUT_S:g})")


def apply_wait_args(args) -> None:
    """Make ``--wait-timeout`` this process's deadline (checked: > 0)."""
    if args.wait_timeout is not None:
        os.environ[WAIT_TIMEOUT_ENV] = str(wait_timeout(args.wait_timeout))


def wait_timeout(value: float | None = None) -> float:
    """The deadline in seconds: ``value``, else ``$HYBRIDRAY_WAIT_TIMEOUT_S``, else 600."""
    if value is not None:
        if value <= 0:
            raise ConfigError(f"--wait-timeout must be > 0 seconds (got {value:g})")
        return float(value)
    raw = os.environ.get(WAIT_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_WAIT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"${WAIT_TIMEOUT_ENV}={raw!r}: must be a number of seconds > 0")
    return seconds


# ---- what Ray's state says ----------------------------------------------------------------

@dataclass(frozen=True)
class Holder:
    """Something that holds CPUs or GPUs on a node."""

    what: str                   # "Serve replica lm/Ingress", "actor Foo", "task bar"
    cpus: float
    gpus: float
    lasting: bool               # an actor or placement group: held until released
    service: str | None = None  # the Serve service it belongs to (for the fix)

    def label(self) -> str:
        parts = [f"{self.cpus:g} CPU"] if self.cpus else []
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU")
        return f"{self.what} ({', '.join(parts) or 'no CPU'})"


@dataclass
class NodeUsage:
    """One alive node: its site and resources, free now, and who holds the rest."""

    node_id: str
    site: str | None
    cpus: float
    gpus: float
    cpus_free: float
    gpus_free: float
    accelerator: str | None = None
    spot: bool = False
    head: bool = False
    holders: list[Holder] = field(default_factory=list)

    @property
    def lasting_cpus(self) -> float:
        return sum(h.cpus for h in self.holders if h.lasting)

    @property
    def lasting_gpus(self) -> float:
        return sum(h.gpus for h in self.holders if h.lasting)


@dataclass(frozen=True)
class Demand:
    """Work Ray has not placed yet for lack of resources."""

    what: str                   # "task _list_files", "placement group of 2 × 1 CPU"
    cpus: float                 # in total
    gpus: float
    sites: tuple[str, ...]      # from its label selectors; () = any site
    job_id: str | None
    key: str                    # function, "CLASS|NAME" of an actor: what ``match`` sees

    def label(self) -> str:
        need = [f"{self.cpus:g} CPU"] if self.cpus else []
        if self.gpus:
            need.append(f"{self.gpus:g} GPU")
        where = f" at {', '.join(self.sites)}" if self.sites else ""
        if not need:
            return f"{self.what} (a node{where or ' of any site'})"
        return f"{self.what} ({', '.join(need)}{where})"


@dataclass
class Usage:
    nodes: list[NodeUsage]
    demands: list[Demand]
    state_api: str | None = None     # why the state API could not be read, else None

    def site(self, site: str) -> list[NodeUsage]:
        return [n for n in self.nodes if n.site == site]

    def describe_site(self, site: str) -> str:
        """``onprem: 0.75 of 2 CPUs free, held by Serve replica lm/Ingress (0.25 CPU), …``"""
        nodes = [n for n in self.site(site) if not n.head or n.cpus or n.gpus]
        if not nodes:
            return f"{site}: no alive node"
        cpus, free = sum(n.cpus for n in nodes), sum(n.cpus_free for n in nodes)
        text = f"{site}: {free:g} of {cpus:g} CPUs free"
        gpus = sum(n.gpus for n in nodes)
        if gpus:
            text += f", {sum(n.gpus_free for n in nodes):g} of {gpus:g} GPUs free"
        holders = _merge([h for n in nodes for h in n.holders])
        if holders:
            text += ", held by " + ", ".join(h.label() for h in holders)
        elif self.state_api:
            text += f" (what holds them is unknown: {self.state_api})"
        return text

    def fix(self, sites: list[str]) -> str:
        """What frees room at ``sites``: the holders to stop, less to ask, more nodes."""
        holders = [h for s in sites for n in self.site(s) for h in n.holders if h.lasting]
        services = sorted({h.service for h in holders if h.service})
        others = sorted({h.what for h in holders if not h.service})
        parts = []
        if services:
            parts.append("delete the Serve service" + ("s " if len(services) > 1 else " ")
                         + ", ".join(repr(s) for s in services)
                         + " (hybridray serve ITS_FILE --delete)")
        if others:
            parts.append("stop " + ", ".join(others[:4]))
        parts.append("ask for fewer CPUs/GPUs, or add nodes at " + ", ".join(sites))
        return "; ".join(parts)


_NO_STATE: dict[str, float] = {}   # GCS address -> when the state API last failed
STATE_RETRY_S = 30.0


def node_usage(*, pending: bool = False) -> Usage:
    """Every alive node's resources and holders, and (``pending``) the unplaced demands.

    Needs a connected Ray driver. Resources and free amounts come from the GCS; holders and
    demands from the state API, which, when it cannot be read, is named in ``state_api``.
    """
    import ray
    from ray._private import state as ray_state

    free = ray_state.available_resources_per_node()
    nodes: dict[str, NodeUsage] = {}
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        labels = n.get("Labels") or {}
        total = n.get("Resources") or {}
        avail = free.get(n["NodeID"], {})
        nodes[n["NodeID"]] = NodeUsage(
            n["NodeID"], labels.get(L.SITE), total.get("CPU", 0.0), total.get("GPU", 0.0),
            avail.get("CPU", 0.0), avail.get("GPU", 0.0), labels.get(L.ACCELERATOR),
            labels.get(L.MARKET_TYPE) == "spot", labels.get(L.ROLE) == "head")
    usage = Usage(list(nodes.values()), [])
    gcs = ray.get_runtime_context().gcs_address
    failed = _NO_STATE.get(gcs)
    if failed is None or time.monotonic() - failed >= STATE_RETRY_S:
        try:
            _read_state(nodes, usage, pending)
            _NO_STATE.pop(gcs, None)
            return usage
        except Exception as e:  # no dashboard, or it is busy: say so instead of guessing
            usage.state_api = _why_no_state(e)
            _NO_STATE[gcs] = time.monotonic()
    usage.state_api = usage.state_api or _why_no_state(None)
    if pending:
        with contextlib.suppress(Exception):
            usage.demands = _gcs_demands(gcs)
    return usage


def _gcs_demands(gcs: str) -> list[Demand]:
    """Without the state API: the shapes the GCS has pending, whoever asked for them (Ray's
    autoscaler reads the same), with no job, name or site attached."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    summary = get_cluster_status(gcs, timeout=5).resource_demands
    out = []
    for kind, demands in (("task or actor", summary.ray_task_actor_demand),
                          ("placement group bundle", summary.placement_group_demand)):
        for demand in demands:
            for req in demand.bundles_by_count:
                cpus, gpus = _cpu_gpu(req.bundle)
                out.append(Demand(f"{req.count} × {kind} {dict(req.bundle)}",
                                  cpus * req.count, gpus * req.count, (), None, ""))
    return out


def _read_state(nodes: dict[str, NodeUsage], usage: Usage, pending: bool) -> None:
    from ray.util.state import list_actors, list_placement_groups, list_tasks

    kw = {"detail": True, "limit": _LIMIT, "timeout": STATE_TIMEOUT_S,
          "raise_on_missing_output": False}
    actors = list_actors(**kw)
    groups = list_placement_groups(**kw)
    running = list_tasks(filters=[("state", "=", "RUNNING")], **kw)
    node_site = {k: v.site for k, v in nodes.items()}
    in_group: dict[str, list[str]] = defaultdict(list)   # pg id -> actor classes in it
    for a in actors:
        if a.placement_group_id and a.state != "DEAD":
            in_group[a.placement_group_id].append(_short_class(a.class_name))
    for a in actors:
        cpus, gpus = _cpu_gpu(a.required_resources)
        if a.state != "ALIVE" or a.placement_group_id or not (cpus or gpus):
            continue
        node = nodes.get(a.node_id or "")
        if node is not None:
            what, service = _actor_words(a.class_name, a.name, a.job_id)
            node.holders.append(Holder(what, cpus, gpus, True, service))
    for g in groups:
        if g.state != "CREATED":
            continue
        members = Counter(in_group.get(g.placement_group_id, []))
        what = "placement group " + (repr(g.name) if g.name else g.placement_group_id[:8])
        if members:
            what += " of " + ", ".join(f"{k}×{v}" if v > 1 else k for k, v in members.items())
        for bundle in g.bundles or []:
            node = nodes.get(bundle.get("node_id") or "")
            cpus, gpus = _cpu_gpu(bundle.get("unit_resources"))
            if node is not None and (cpus or gpus):
                node.holders.append(Holder(what, cpus, gpus, True))
    for t in running:
        cpus, gpus = _cpu_gpu(t.required_resources)
        node = nodes.get(t.node_id or "")
        if t.type == "NORMAL_TASK" and not t.placement_group_id and node and (cpus or gpus):
            node.holders.append(Holder(f"task {t.name}", cpus, gpus, False))
    if not pending:
        return
    # Pending work that names a site is reported whatever it asks for: zero CPUs still need
    # an alive node there (a site whose node is down).
    for g in groups:
        if g.state in ("PENDING", "RESCHEDULING"):
            bundles = g.bundles or []
            cpus = sum(_cpu_gpu(b.get("unit_resources"))[0] for b in bundles)
            gpus = sum(_cpu_gpu(b.get("unit_resources"))[1] for b in bundles)
            members = sorted(set(in_group.get(g.placement_group_id, [])))
            sites = _sites_of([b.get("label_selector") for b in bundles], node_site)
            usage.demands.append(Demand(
                f"placement group of {len(bundles)} bundle(s)"
                + (f" for {', '.join(members)}" if members else ""),
                cpus, gpus, sites, g.creator_job_id, ",".join(members) or g.placement_group_id))
    for a in actors:
        cpus, gpus = _cpu_gpu(a.required_resources)
        if a.state == "PENDING_CREATION" and not a.placement_group_id:
            what, _ = _actor_words(a.class_name, a.name, a.job_id)
            sites = _sites_of([a.label_selector, *_fallbacks(a.fallback_strategy)], node_site)
            if not (cpus or gpus or sites):
                continue        # a worker process still starting, not a wait for resources
            usage.demands.append(Demand(what, cpus, gpus, sites, a.job_id,
                                        f"{a.class_name or ''}|{a.name or ''}"))
    waiting = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], **kw)
    by_kind: dict[tuple, list] = defaultdict(list)
    for t in waiting:
        cpus, gpus = _cpu_gpu(t.required_resources)
        if t.type != "NORMAL_TASK" or t.placement_group_id:
            continue
        sites = _sites_of([t.label_selector, *_fallbacks(t.fallback_strategy)], node_site)
        if not (cpus or gpus or sites):
            continue
        by_kind[(t.name, cpus, gpus, sites, t.job_id)].append(t)
    for (name, cpus, gpus, sites, job), tasks in by_kind.items():
        what = f"task {name}" if len(tasks) == 1 else f"{len(tasks)} tasks {name}"
        usage.demands.append(Demand(what, cpus * len(tasks), gpus * len(tasks), sites, job,
                                    name))


def _why_no_state(e: Exception | None) -> str:
    text = "" if e is None else (str(e).strip().splitlines()[0] if str(e).strip()
                                 else type(e).__name__)
    low = text.lower()
    if e is None or "dashboard" in low or "connect" in low or "refused" in low:
        return "Ray's state API is served by the dashboard, which is not reachable " \
               "(a cluster started with --no-dashboard)"
    return f"Ray's state API did not answer ({text[:160]})"


def _cpu_gpu(resources) -> tuple[float, float]:
    """CPU and GPU of a resource dict; a placement group's ``CPU_group_…`` keys count too."""
    cpus = gpus = 0.0
    for key, value in (resources or {}).items():
        if key == "CPU" or (key.startswith("CPU_group_") and key.count("_") == 2):
            cpus += float(value)
        elif key == "GPU" or (key.startswith("GPU_group_") and key.count("_") == 2):
            gpus += float(value)
    return cpus, gpus


def _short_class(name: str | None) -> str:
    return (name or "actor").split(":", 1)[0].rsplit(".", 1)[-1]


def _actor_words(class_name: str | None, name: str | None, job: str | None
                 ) -> tuple[str, str | None]:
    """How a person would name an actor, and its Serve service if it is a replica."""
    cls = class_name or "actor"
    if cls.startswith("ServeReplica:"):
        _, app, deployment = (cls.split(":", 2) + ["", ""])[:3]
        shown = app if app.endswith(deployment) or not deployment else f"{app}/{deployment}"
        return f"Serve replica {shown}", app.split(".", 1)[0] or None
    cls = cls.rsplit(".", 1)[-1]      # a class defined in a function: "f.<locals>.Holder"
    shown = f"actor {cls}" + (f" {name!r}" if name else "")
    return shown + (f" of job {job}" if job else ""), None


def _fallbacks(strategy) -> list[dict]:
    """Label selectors of a fallback strategy: a list of options (actors) or
    ``{"options": [...]}`` (tasks), each ``{"label_selector": {...}}``."""
    if isinstance(strategy, dict):
        strategy = strategy.get("options") or []
    out = []
    for option in strategy or []:
        if isinstance(option, dict):
            out.append(option.get("label_selector") or option)
    return out


def _sites_of(selectors, node_site: dict[str, str | None]) -> tuple[str, ...]:
    """Sites named by label selectors (``site: onprem`` or ``in(a,b)``); () = anywhere."""
    known = sorted({s for s in node_site.values() if s})
    out: list[str] = []
    for sel in selectors:
        value = sel.get(L.SITE) if isinstance(sel, dict) else None
        if not value:
            continue
        if value.startswith("in(") and value.endswith(")"):
            names = [v.strip() for v in value[3:-1].split(",")]
        elif value.startswith("!"):
            names = [s for s in known if s != value[1:]]
        else:
            names = [value]
        out.extend(n for n in names if n not in out)
    return tuple(out)


def _merge(holders: list[Holder]) -> list[Holder]:
    """One entry per holder name, resources added up, biggest first."""
    merged: dict[tuple, list[float]] = {}
    for h in holders:
        key = (h.what, h.lasting, h.service)
        acc = merged.setdefault(key, [0.0, 0.0])
        acc[0] += h.cpus
        acc[1] += h.gpus
    out = [Holder(k[0], v[0], v[1], k[1], k[2]) for k, v in merged.items()]
    return sorted(out, key=lambda h: (-h.cpus, -h.gpus, h.what))


# ---- waiting ------------------------------------------------------------------------------

def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class waiting:  # noqa: N801  (a context manager used as ``with waiting(...)``)
    """Report, then give up on, a blocking call that waits on Ray for resources.

    ``with waiting("train my-gru"): trainer.fit()``. ``match`` picks the demands that are
    this call's (default: those of this driver's job). A daemon thread polls Ray's state
    every second (every ``QUIET_POLL_S`` once nothing of ours has been pending for
    ``QUIET_AFTER_S``); nothing is printed while nothing of ours is pending. At the deadline it
    calls ``stop`` (e.g. kill the Ray Train controller), or else interrupts the main thread
    as Ctrl-C would (a blocked ``ray.get`` raises ``KeyboardInterrupt``), and
    ``ResourceWaitTimeout`` is raised on leaving the block.
    """

    def __init__(self, what: str, *, timeout: float | None = None,
                 say: Callable[[str], None] | None = None,
                 match: Callable[[Demand], bool] | None = None,
                 stop: Callable[[], None] | None = None,
                 first_report_s: float = FIRST_REPORT_S, every_s: float = REPORT_EVERY_S):
        self.what = what
        self.stop = stop
        self.timeout = wait_timeout(timeout)
        self.say = say or _stderr
        self.match = match
        self.first_report_s, self.every_s = first_report_s, every_s
        self.reports: list[str] = []
        self.gave_up: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interrupt = False

    def __enter__(self) -> waiting:
        import ray

        if self.match is None and ray.is_initialized():
            job = ray.get_runtime_context().get_job_id()
            # a demand of no known job comes from the GCS (no state API): it may be ours
            self.match = lambda d: d.job_id in (job, None)
        self._interrupt = threading.current_thread() is threading.main_thread()
        self._sigint = None
        if self._interrupt and not callable(signal.getsignal(signal.SIGINT)):
            # A process started with SIGINT ignored (a background job of a script, nohup)
            # has no handler for interrupt_main to call: the give-up would never reach the
            # blocked call. Install Python's own for the length of the wait.
            self._sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        self._thread = threading.Thread(target=self._run, name="hybridray-waiting",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:   # a poll in flight is abandoned: it only reads
            self._thread.join(timeout=2)
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
        if self.gave_up is not None:
            raise ResourceWaitTimeout(self.gave_up) from None
        return False

    def _run(self) -> None:
        since: float | None = None
        last: float | None = None
        warned = False
        active = time.monotonic()     # when something of ours was last pending
        while not self._stop.wait(POLL_S if time.monotonic() - active < QUIET_AFTER_S
                                  else QUIET_POLL_S):
            try:
                usage = node_usage(pending=True)
            except Exception as e:   # watching must never take the work down
                if not warned:
                    self.say(f"{self.what}: cannot read Ray's state to report waits ({e})")
                    warned = True
                continue
            if self._stop.is_set():
                return
            ours = [d for d in usage.demands if self.match is None or self.match(d)]
            now = time.monotonic()
            if not ours:
                since = last = None
                continue
            active = now
            since = since or now
            waited = now - since
            if self._stop.is_set():
                return
            if waited >= self.timeout:
                self.gave_up = (f"{self.what}: gave up after waiting {waited:.0f} s for "
                                + self._facts(usage, ours) + ". Fix: "
                                + usage.fix(_sites(usage, ours)) + ", or wait longer "
                                f"(--wait-timeout SECONDS or ${WAIT_TIMEOUT_ENV})")
                if self.stop is not None:
                    try:
                        self.stop()
                    except Exception as e:  # fall back to interrupting, as Ctrl-C would
                        self.say(f"{self.what}: could not stop the wait ({e}); interrupting")
                        self.stop = None
                if self.stop is None and self._interrupt:
                    with contextlib.suppress(Exception):
                        _thread.interrupt_main()
                return
            if waited + POLL_S >= self.first_report_s and (last is None
                                                           or now - last >= self.every_s):
                line = (f"{self.what}: waiting {waited:.0f} s for " + self._facts(usage, ours)
                        + f"; giving up in {self.timeout - waited:.0f} s")
                self.reports.append(line)
                self.say(line)
                last = now

    @staticmethod
    def _facts(usage: Usage, demands: list[Demand]) -> str:
        wanted = "; ".join(d.label() for d in demands[:4])
        if len(demands) > 4:
            wanted += f" and {len(demands) - 4} more"
        sites = _sites(usage, demands)
        return wanted + " — " + " | ".join(usage.describe_site(s) for s in sites)


def _sites(usage: Usage, demands: list[Demand]) -> list[str]:
    named = [s for d in demands for s in d.sites]
    if named:
        return list(dict.fromkeys(named))
    return sorted({n.site for n in usage.nodes if n.site and (n.cpus or n.gpus)})
