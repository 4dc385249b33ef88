"""From a serve file and a topology to Serve applications, placed by policy and audited.

Every (model, version, site) becomes one replica deployment whose Ray options come from
``hybridray.placement``: ``decide`` for a ``serve`` workload pinned to that site, compiled by
``serve_options`` into a label selector on the site *and* on the data classes its nodes may
hold. A site that may not hold the model's data (a model trained on restricted data, a
cloud that may hold confidential at most) is refused here, before anything is deployed, with
the rule and the fix; every decision, refusal included, goes to the audit log.

The ingress is placed like any workload that sees the service's data (its highest class):
spread over the sites that serve its models. Its routing table, limits and token digests
are its ``user_config``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridray import labels as L
from hybridray.audit import AuditLog
from hybridray.exceptions import ConfigError, PlacementRefused
from hybridray.placement.compile import serve_options
from hybridray.placement.decision import Placement
from hybridray.placement.policy import decide
from hybridray.placement.workload import Workload, WorkloadKind
from hybridray.serve.config import ModelConfig, ServeConfig, SiteScale, VersionConfig
from hybridray.topology.models import DataClass, Topology

INGRESS = "Ingress"
REPLICA_IMPORT = "hybridray.serve.apps:replica_app"
INGRESS_IMPORT = "hybridray.serve.apps:ingress_app"


def _code_version() -> str:
    """hybridray's version plus a hash of this package's sources.

    Part of every application's args, so replicas restart on new serving code (Serve hashes
    an application's import path and args into its code version, not the code itself).
    """
    h = hashlib.sha256(__import__("hybridray").__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return f"hybridray-{__import__('hybridray').__version__}-{h.hexdigest()[:12]}"


CODE_VERSION = _code_version()


@dataclass(frozen=True)
class ReplicaPlan:
    """One replica deployment: a model version at one site."""

    model: str
    version: str
    site: str
    kind: str
    app: str                  # its own Serve application (multi-application mode)
    deployment: str
    spec: dict[str, Any]      # the replica's constructor argument
    options: dict[str, Any]   # Serve deployment options (the same keys as a Serve config)
    placement: Placement


@dataclass
class ServePlan:
    """Everything ``deploy`` needs, computed and checked before anything is started."""

    config: ServeConfig
    topology: Topology
    replicas: list[ReplicaPlan]
    ingress_options: dict[str, Any]
    ingress_sites: list[str]
    data_class: DataClass
    model_classes: dict[str, DataClass] = field(default_factory=dict)
    transfers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name

    def routing(self, digests: list[str], *, single_app: bool = False,
                only: set[str] | None = None) -> dict[str, Any]:
        """The ingress's ``user_config``; ``only`` limits routes to those replica apps."""
        cfg = self.config
        models: dict[str, Any] = {}
        for m in cfg.models:
            versions = {}
            for v in m.versions:
                sites = {r.site: {"app": None if single_app else r.app,
                                  "deployment": r.deployment}
                         for r in self.replicas if r.model == m.name and r.version == v.name
                         and (only is None or r.app in only)}
                if sites:
                    versions[v.name] = {"weight": v.weight, "sites": sites}
            models[m.name] = {"kind": m.kind, "data_class": self.model_classes[m.name].value,
                              "versions": versions}
        latency = {a: {b: (self.topology.link(a, b).latency_ms
                           if self.topology.link(a, b) else 1e9)
                       for b in self.topology.sites if b != a}
                   for a in self.topology.sites}
        table = {"models": models, "sites": list(self.topology.sites), "latency_ms": latency,
                 "limits": cfg.limits.model_dump(mode="json"),
                 "ingress": cfg.ingress.model_dump(mode="json"),
                 "auth": {"enabled": cfg.auth.enabled, "digests": sorted(digests),
                          "public_paths": list(cfg.auth.public_paths)}}
        # Every ingress replica reports the generation it applied, so a deploy can wait
        # until all of them route by this table before it removes what the table dropped.
        table["generation"] = hashlib.sha256(json.dumps(table, sort_keys=True).encode()) \
            .hexdigest()[:16]
        return table

    def serve_config(self, digests: list[str], *, only: set[str] | None = None,
                     routes_only: set[str] | None = None) -> dict[str, Any]:
        """Serve's multi-application config (``serve deploy`` reads the same shape).

        ``only`` limits the replica applications included; ``routes_only`` limits what the
        ingress routes to (deploy uses both to bring versions in and out without failures).
        """
        apps = [{"name": r.app, "route_prefix": None, "import_path": REPLICA_IMPORT,
                 "args": {"kind": r.kind, "deployment": r.deployment, "spec": r.spec,
                          "code": CODE_VERSION},
                 "deployments": [{"name": r.deployment, **r.options}]}
                for r in self.replicas if only is None or r.app in only]
        ingress = {"name": self.name, "route_prefix": self.config.route_prefix,
                   "import_path": INGRESS_IMPORT,
                   "args": {"service": self.name, "code": CODE_VERSION},
                   "deployments": [{"name": INGRESS, **self.ingress_options,
                                    "user_config": self.routing(digests, only=routes_only)}]}
        http = self.config.http
        return {"proxy_location": http.proxy_location,
                "http_options": {"host": http.host, "port": http.port,
                                 "request_timeout_s": http.request_timeout_s},
                "applications": [ingress, *apps]}


def plan_service(config: ServeConfig, topology: Topology, *, audit: AuditLog | None = None,
                 capacity=None) -> ServePlan:
    """Place every model version at its sites and the ingress; raise if any is refused.

    Raises:
        PlacementRefused: a site may not (residency) or cannot (shape, capacity) run a
            replica; the message lists every refusal with its fix.
        ConfigError: a model's source or data class is wrong.
    """
    replicas: list[ReplicaPlan] = []
    refusals: list[str] = []
    classes: dict[str, DataClass] = {}
    transfers: list[dict[str, Any]] = []
    for model in config.models:
        for version in model.versions:
            source, cls, origin = _source(model, version, topology)
            classes[model.name] = max(classes.get(model.name, DataClass.public), cls)
            sites = _sites(config, model, cls, topology, audit, capacity, refusals)
            for site, scale in sites.items():
                placement = _place(config, model, version, site, scale, cls, topology, capacity)
                if audit is not None:
                    audit.placement(placement, cluster=topology.name, source="serve",
                                    service=config.name)
                if not placement.ok:
                    refusals.append(f"{model.name}@{version.name} at {site}: "
                                    f"{placement.refusal.message} Fix: {placement.refusal.fix}")
                    continue
                replicas.append(_replica(config, model, version, site, scale, cls, source,
                                         placement))
                if origin is not None and origin[0] != site:
                    transfers.append({"src": origin[0], "dst": site, "bytes": origin[1],
                                      "cost": topology.egress_cost(origin[0], site, origin[1]),
                                      "what": f"{model.name}@{version.name} weights"})
    if refusals:
        raise PlacementRefused(f"service {config.name!r}: " + " | ".join(refusals),
                               rule="serve",
                               fix="serve each model only at sites its data class allows, "
                                   "with room for one replica (see hybridray place)")
    service_class = max(classes.values(), default=DataClass.public)
    _check_proxy_location(config, service_class, topology, audit)
    ingress_options, ingress_sites = _ingress(config, service_class, replicas, topology, audit,
                                              capacity)
    return ServePlan(config, topology, replicas, ingress_options, ingress_sites,
                     service_class, classes, transfers)


def _check_proxy_location(config: ServeConfig, cls: DataClass, topology: Topology,
                          audit: AuditLog | None) -> None:
    """Refuse (rule ``residency``, audited) an HTTP proxy location whose nodes may not hold
    the service's class: every request body (prompts, inputs) passes through the proxy.

    Ray places its proxies itself, without label selectors: ``HeadOnly`` on the head,
    ``EveryNode`` on the head and every node that runs a replica of *any* application (and
    a client may call any of them), so ``EveryNode`` is allowed only where every site may
    hold the class. ``Disabled`` starts no proxy (handles only).
    """
    where = config.http.proxy_location
    if where == "Disabled":
        return
    head = topology.head.site
    if where == "HeadOnly":
        limit = topology.sites[head].max_data_class
        if limit >= cls:
            return
        message = (f"service {config.name!r} serves {cls.value} models, but its HTTP proxy "
                   f"(proxy_location: HeadOnly) runs on the head at site {head}, which may "
                   f"hold up to {limit.value}, and sees every request body")
        fix = (f"serve it from a cluster whose head is at a site that may hold {cls.value}, "
               "or set http.proxy_location: Disabled and call the models through Ray Serve "
               "handles from allowed sites")
    else:
        low = [s for s, site in topology.sites.items() if site.max_data_class < cls]
        if not low:
            return
        message = (f"service {config.name!r} serves {cls.value} models, but proxy_location: "
                   f"EveryNode lets Ray run an HTTP proxy, which sees every request body, on "
                   f"nodes at {', '.join(low)}, which may not hold {cls.value}")
        fix = ("set http.proxy_location: HeadOnly (the head is at site "
               f"{head}, which may hold {topology.sites[head].max_data_class.value})"
               if topology.sites[head].max_data_class >= cls else
               "set http.proxy_location: Disabled and call the models through Ray Serve "
               "handles from allowed sites")
    error = PlacementRefused(message, rule="residency", fix=fix)
    if audit is not None:
        audit.refusal(error, what="serve http proxy", service=config.name,
                      data_class=cls.value, proxy_location=where, cluster=topology.name)
    raise error


# ---- models -----------------------------------------------------------------------------

def _source(model: ModelConfig, version: VersionConfig, topology: Topology):
    """(location replicas load, data class, (origin site, bytes) or None)."""
    source = version.source or model.source
    if model.kind == "embedding":
        return source, model.data_class or DataClass.public, None
    from hybridray.storage.fs import parse_address
    from hybridray.storage.secrets import ClusterSecrets
    from hybridray.train.checkpoint import MODEL_FILE, CheckpointReader, read_config, read_meta
    from hybridray.train.kinds import CustomModelConfig

    origin_site, fs, path, location = None, None, source, source
    if ":" in source and "://" not in source and not Path(source).exists():
        address = parse_address(source, topology)
        fs, path = address.resolve(topology)
        origin_site, location = address.site, address.uri(topology)
    elif "://" not in source:
        path = location = str(Path(source).expanduser().absolute())
    try:
        given = CheckpointReader(path, fs)
        reader = _latest(given)
        meta = read_meta(reader, ClusterSecrets(topology.name).signing_key(),
                         topology.default_data_class.value)  # a hand edit is refused
        held = read_config(reader)
        size = reader.fs.get_file_info(reader.where(MODEL_FILE)).size or 0
    except Exception as e:  # TrainError names the file; anything else is as useful
        raise ConfigError(f"models.{model.name}: source {source!r}: {e}") from None
    if isinstance(held, CustomModelConfig):
        raise ConfigError(f"models.{model.name}: source {source!r} holds your own model "
                          f"({held.factory}); the completion route serves hybridray GPT "
                          "checkpoints (model.size in the train config). Load yours with "
                          "hybridray.train.load_model and serve it from your own deployment")
    if reader.path != given.path:   # a run directory: serve its newest checkpoint
        location = f"{location.rstrip('/')}/{reader.path.rsplit('/', 1)[1]}"
    cls = DataClass(meta["data_class"])
    if model.data_class is not None and model.data_class < cls:
        raise ConfigError(f"models.{model.name}.data_class: {model.data_class.value} is below "
                          f"the checkpoint's own class {cls.value} ({source}); a serve file "
                          "may raise a model's class, never lower it")
    cls = max(cls, model.data_class or cls)
    origin_site = origin_site or (meta.get("site") if meta.get("site") in topology.sites
                                  else None)
    return location, cls, (origin_site, int(size)) if origin_site else None


def _latest(reader):
    """The checkpoint itself, or the newest complete checkpoint in a run directory."""
    from hybridray.train.checkpoint import complete_checkpoints

    try:
        reader.check_complete()
        return reader
    except Exception as first:
        newest = next(complete_checkpoints(reader.fs, reader.path), None)
        if newest is None:
            raise first from None
        return newest


def _workload(config: ServeConfig, model: ModelConfig, name: str, cls: DataClass, *,
              count: int, site: str | None = None) -> Workload:
    r = model.replica
    return Workload(name=name, kind=WorkloadKind.serve, cpus=r.cpus, gpus=r.gpus,
                    memory_gb=r.memory_gb, count=max(count, 1), data_classes=(cls,),
                    preference=model.prefer if site is None else "site", site=site,
                    burst=site is None)


def _sites(config: ServeConfig, model: ModelConfig, cls: DataClass, topology: Topology,
           audit: AuditLog | None, capacity, refusals: list[str]) -> dict[str, SiteScale]:
    if model.sites is not None:
        unknown = [s for s in model.sites if s not in topology.sites]
        if unknown:
            raise ConfigError(f"models.{model.name}.sites: unknown site {unknown[0]!r} "
                              f"(cluster {topology.name!r} has {', '.join(topology.sites)})")
        return dict(model.sites)
    wl = _workload(config, model, f"serve:{config.name}/{model.name}", cls, count=1)
    placement = decide(topology, wl, capacity)
    if audit is not None:
        audit.placement(placement, cluster=topology.name, source="serve", service=config.name)
    if not placement.ok:
        refusals.append(f"{model.name}: {placement.refusal.message} Fix: "
                        f"{placement.refusal.fix}")
        return {}
    return {s: SiteScale() for s in placement.sites[:model.max_sites]}


def _place(config: ServeConfig, model: ModelConfig, version: VersionConfig, site: str,
           scale: SiteScale, cls: DataClass, topology: Topology, capacity) -> Placement:
    wl = _workload(config, model, f"serve:{config.name}/{model.name}@{version.name}/{site}",
                   cls, count=max(scale.min_replicas, 1), site=site)
    return decide(topology, wl, capacity)


def deployment_name(model: str, version: str, site: str) -> str:
    return f"{model}.{version}.{site}"


def _replica(config: ServeConfig, model: ModelConfig, version: VersionConfig, site: str,
             scale: SiteScale, cls: DataClass, source: str, placement: Placement) -> ReplicaPlan:
    r, a = model.replica, model.autoscaling
    spec = {"service": config.name, "model": model.name, "version": version.name,
            "site": site, "kind": model.kind, "data_class": cls.value, "source": source,
            "quantize": version.quantize or model.quantize,
            "min_cosine": model.accuracy.min_cosine,
            "max_perplexity_ratio": model.accuracy.max_perplexity_ratio,
            "threads": r.threads, "cpus": r.cpus}
    autoscaling = {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
                   "target_ongoing_requests": a.target_ongoing_requests,
                   "upscale_delay_s": a.upscale_delay_s,
                   "downscale_delay_s": a.downscale_delay_s,
                   "look_back_period_s": a.look_back_period_s,
                   "metrics_interval_s": a.metrics_interval_s}
    if scale.initial_replicas is not None:
        autoscaling["initial_replicas"] = scale.initial_replicas
    for key in ("upscaling_factor", "downscaling_factor"):
        if getattr(a, key) is not None:
            autoscaling[key] = getattr(a, key)
    actor = copy.deepcopy(serve_options(placement)["ray_actor_options"])
    actor.pop("fallback_strategy", None)   # burst is off: a site's replicas stay at the site
    options = {"ray_actor_options": actor, "autoscaling_config": autoscaling,
               "max_ongoing_requests": r.max_ongoing_requests,
               "max_queued_requests": r.max_queued_requests,
               "health_check_period_s": r.health_check_period_s,
               "health_check_timeout_s": r.health_check_timeout_s,
               "graceful_shutdown_timeout_s": r.graceful_shutdown_timeout_s,
               "max_surge_percent": 100}
    if model.kind == "embedding":
        options["user_config"] = model.batching.model_dump(mode="json")
    return ReplicaPlan(model.name, version.name, site, model.kind,
                       f"{config.name}.{model.name}.{version.name}.{site}",
                       deployment_name(model.name, version.name, site), spec, options,
                       placement)


# ---- ingress ----------------------------------------------------------------------------

def _ingress(config: ServeConfig, cls: DataClass, replicas: list[ReplicaPlan],
             topology: Topology, audit: AuditLog | None, capacity):
    ing = config.ingress
    wl = Workload(name=f"serve:{config.name}/ingress", kind=WorkloadKind.serve, cpus=ing.cpus,
                  count=ing.replicas, data_classes=(cls,))
    placement = decide(topology, wl, capacity)
    if audit is not None:
        audit.placement(placement, cluster=topology.name, source="serve", service=config.name)
    placement.raise_if_refused()
    serving = {r.site for r in replicas}
    sites = [s for s in placement.sites if s in serving] or placement.sites
    actor = copy.deepcopy(serve_options(placement)["ray_actor_options"])
    actor.pop("fallback_strategy", None)
    actor["label_selector"] = {**actor["label_selector"],
                               L.SITE: sites[0] if len(sites) == 1 else f"in({','.join(sites)})"}
    nodes = sum(p.max_nodes for s in sites for p in topology.sites[s].pools)
    options = {"num_replicas": ing.replicas, "ray_actor_options": actor,
               "max_ongoing_requests": ing.max_ongoing_requests,
               "max_queued_requests": ing.max_queued_requests,
               "backpressure_config": {"status_code": 503, "retry_after_s": ing.retry_after_s},
               "health_check_period_s": 5.0, "health_check_timeout_s": 10.0,
               "graceful_shutdown_timeout_s": 30.0, "max_surge_percent": 100}
    if 1 < ing.replicas <= nodes:
        # Spread: one ingress per node, so across sites. A surge replica would find no
        # free node, so restarts go one replica at a time (the proxy uses the others).
        options["max_replicas_per_node"] = 1
        options["max_surge_percent"] = 0
    return options, sites
