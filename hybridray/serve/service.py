"""Deploy, change and remove a service on a running cluster, without failing requests.

A service is Serve applications deployed declaratively (the same mechanism as
``serve deploy``): one for the ingress and one per (model, version, site). Serve then
applies changes as lightly as it can: traffic weights, limits and tokens are the ingress's
``user_config`` (reconfigured in place), autoscaling bounds are deployment options (no
restart), and a new version is a new application beside the old one.

Versions come and go in three steps, so no request is ever routed to a replica that is not
there yet, or no longer there:

1. start new replica applications; the ingress keeps its current routes; wait until running;
2. give the ingress the new routes (weights included); wait until every replica has them;
3. remove replica applications that left the config (their replicas drain gracefully).

Other declarative Serve applications on the cluster (other services) are left as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridray.api import Cluster
from hybridray.exceptions import ClusterError, ConfigError
from hybridray.serve.config import ServeConfig, config_from_dict, load_serve_config
from hybridray.serve.gate import digest
from hybridray.serve.plan import ServePlan, plan_service
from hybridray.topology.models import NAME_PATTERN

log = logging.getLogger(__name__)
MIN_TOKEN_CHARS = 16


def read_token_digests(config: ServeConfig) -> list[str]:
    """SHA-256 digests of the service's bearer tokens (from the env var and/or the file).

    Raises:
        ConfigError: auth is on but no token is set, or a token is too short.
    """
    auth = config.auth
    if not auth.enabled:
        return []
    tokens: list[str] = []
    if auth.tokens_env:
        tokens += [t.strip() for t in os.environ.get(auth.tokens_env, "").split(",")]
    if auth.token_file:
        path = Path(auth.token_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ConfigError(f"auth.token_file: cannot read {path} ({e})") from None
        tokens += [t.strip() for t in lines if not t.strip().startswith("#")]
    tokens = [t for t in tokens if t]
    if not tokens:
        where = " or ".join(x for x in (f"${auth.tokens_env}" if auth.tokens_env else "",
                                          f"auth.token_file ({auth.token_file})"
                                          if auth.token_file else "") if x)
        job = (" A Ray job (ray job submit) has the head's environment, not your shell's: "
               "pass the variable with --runtime-env-json '{\"env_vars\": "
               "{\"HYBRIDRAY_SERVE_TOKENS\": \"...\"}}' or give auth.token_file=PATH of a "
               "file on the head node (docs/serving.md)") \
            if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") \
            else ""
        raise ConfigError(f"auth.enabled: no bearer token found in {where or 'nothing'}; set "
                          "one (comma-separated for several), or auth.enabled=false for a "
                          "service nobody outside this machine can reach." + job)
    short = [t for t in tokens if len(t) < MIN_TOKEN_CHARS]
    if short:
        raise ConfigError(f"auth: a token has {len(short[0])} characters; use at least "
                          f"{MIN_TOKEN_CHARS} (e.g. python -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))')")
    return sorted({digest(t) for t in tokens})


@dataclasses.dataclass
class Service:
    """A deployed service: its plan, where to reach it, and how to change it."""

    config: ServeConfig
    plan: ServePlan
    cluster: Cluster

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        """Base URL of the OpenAI-style API (``{url}/v1/completions``)."""
        http = self.config.http
        host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
        return f"http://{host}:{http.port}{self.config.route_prefix.rstrip('/')}"

    def status(self) -> dict[str, Any]:
        """Serve's view: per application its status, per deployment replicas by state."""
        return service_status(self.name)

    def wait(self, timeout_s: float = 600.0) -> Service:
        """Until every application runs and every ingress replica routes by this plan
        (after ``deploy(..., wait=False)``)."""
        apps = [self.name, *sorted({r.app for r in self.plan.replicas})]
        _wait(apps, timeout_s, lambda line: log.info(line))
        _wait_routing(self.name, self.plan.routing(read_token_digests(self.config))
                      ["generation"], timeout_s)
        return self

    def with_weights(self, weights: dict[str, dict[str, float]]) -> ServeConfig:
        models = []
        for m in self.config.models:
            new = weights.get(m.name)
            if new is None:
                models.append(m)
                continue
            unknown = set(new) - {v.name for v in m.versions}
            if unknown:
                raise ConfigError(f"models.{m.name}: no version {sorted(unknown)[0]!r}")
            models.append(m.model_copy(update={"versions": tuple(
                v.model_copy(update={"weight": float(new.get(v.name, v.weight))})
                for v in m.versions)}))
        return _revalidate(self.config, models)

    def shift(self, weights: dict[str, dict[str, float]], **kwargs: Any) -> Service:
        """Set traffic weights, e.g. ``{"lm": {"v1": 90, "v2": 10}}`` (in place, no restart)."""
        return deploy(self.with_weights(weights), cluster=self.cluster, **kwargs)

    def add_version(self, model: str, version: dict[str, Any], **kwargs: Any) -> Service:
        """Deploy another version beside the current ones (``{"name", "weight", "source"}``)."""
        data = self.config.model_dump(mode="json")
        for m in data["models"]:
            if m["name"] == model:
                m["versions"].append(dict(version))
        if not any(m["name"] == model for m in data["models"]):
            raise ConfigError(f"service {self.name!r} has no model {model!r}")
        return deploy(config_from_dict(data, f"service {self.name}"), cluster=self.cluster,
                      **kwargs)

    def promote(self, model: str, version: str, **kwargs: Any) -> Service:
        """Send all traffic to ``version`` and remove the model's other versions."""
        return deploy(_only(self.config, model, version), cluster=self.cluster, **kwargs)

    rollback = promote   # rolling back is promoting the version you go back to

    def delete(self, timeout_s: float = 120.0) -> None:
        delete(self.name, timeout_s=timeout_s)


def _revalidate(config: ServeConfig, models: list) -> ServeConfig:
    data = config.model_dump(mode="json")
    data["models"] = [m.model_dump(mode="json") for m in models]

    return config_from_dict(data, f"service {config.name}")


def _only(config: ServeConfig, model: str, version: str) -> ServeConfig:
    try:
        m = config.model(model)
    except StopIteration:
        raise ConfigError(f"service {config.name!r} has no model {model!r}") from None
    keep = [v for v in m.versions if v.name == version]
    if not keep:
        raise ConfigError(f"models.{model}: no version {version!r} (versions: "
                          f"{', '.join(v.name for v in m.versions)})")
    new = m.model_copy(update={"versions": (keep[0].model_copy(update={"weight": 100.0}),)})
    return _revalidate(config, [new if x.name == model else x for x in config.models])


# ---- deploying ----------------------------------------------------------------------------

def deploy(config: ServeConfig | str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
           *, cluster: Cluster | None = None, wait: bool = True, timeout_s: float = 600.0,
           progress: Callable[[str], None] | None = None) -> Service:
    """Deploy (or update) a service on a running cluster and wait until it serves.

    Args:
        config: a ``ServeConfig`` or the path of a serve file.
        overrides: ``key.sub=value`` overrides (with a path).
        cluster: a connected ``hybridray.Cluster`` (default: ``hybridray.connect`` to the
            file's ``cluster``, ``$HYBRIDRAY_CLUSTER`` or the only recorded one).
        wait: wait until every application runs (and, for changes, follow the three steps
            above); without it, only the first step is submitted.
        timeout_s: how long to wait for each step.
        progress: called with one line per step.

    Raises:
        ConfigError, PlacementRefused: before anything is deployed.
        ClusterError: an application failed (e.g. a replica's quantized model missed its
            accuracy bound) or did not run within ``timeout_s``; the message has Serve's.
    """
    say = progress or (lambda line: log.info(line))
    if not isinstance(config, ServeConfig):
        config = load_serve_config(config, overrides)
    if cluster is None:
        import hybridray

        cluster = hybridray.connect(config.cluster)
    # full-size capacity (serving queues rather than refuses), less the drift nodes
    capacity = cluster.capacity(live=False) if hasattr(cluster, "capacity") else None
    plan = plan_service(config, cluster.topology, audit=cluster.audit, capacity=capacity)
    digests = read_token_digests(config)
    for t in plan.transfers:
        cluster.audit.transfer(t["src"], t["dst"], t["bytes"], t["cost"], what=t["what"],
                               service=config.name)
    client = _start_serve(config)
    target = plan.serve_config(digests)
    ours = _ours(client, config.name)
    others = _others(client, config.name)
    new_apps = {a["name"] for a in target["applications"][1:]}
    old_apps = {n for n in ours if n != config.name}
    removed, added = old_apps - new_apps, new_apps - old_apps
    keep_removed = [ours[n] for n in sorted(removed)]
    ingress_now = ours.get(config.name)

    def apply(apps: list[dict[str, Any]], step: str) -> None:
        schema = {**target, "applications": apps + others}
        say(f"{config.name}: {step}")
        _apply(client, schema)

    try:
        return _roll_out(config, plan, cluster, target, ingress_now, added, removed,
                         keep_removed, new_apps, apply, wait, timeout_s, say)
    except KeyboardInterrupt:      # Ctrl-C: take back what this call started, then stop
        _undo(client, config.name, target, ours, others, say)
        raise


def _undo(client: Any, name: str, target: dict[str, Any], before: dict[str, Any],
          others: list[dict[str, Any]], say: Any) -> None:
    """Put the service back as it was before an interrupted deploy: gone if it was new, its
    previous applications if it was an update. Submitted, not waited for (Ctrl-C is meant
    to be prompt); Serve's controller carries it out."""
    from ray import serve

    try:
        if before:
            _apply(client, {**target, "applications": [*before.values(), *others]})
            say(f"{name}: interrupted; the previous configuration is restored")
        elif others:
            _apply(client, {**target, "applications": others})
            say(f"{name}: interrupted; its applications are being removed")
        else:
            for app in _ours(client, name):
                serve.delete(app, _blocking=False)
            say(f"{name}: interrupted; its applications are being removed")
    except Exception as e:   # never hide the interrupt behind a clean-up error
        say(f"{name}: interrupted; could not undo the deploy ({type(e).__name__}: {e}); "
            f"remove it with: hybridray serve FILE --delete")


def _roll_out(config, plan, cluster, target, ingress_now, added, removed, keep_removed,
              new_apps, apply, wait, timeout_s, say) -> Service:
    if ingress_now is not None and added:
        apply([ingress_now, *target["applications"][1:], *keep_removed],
              f"starting {len(added)} new replica application(s) beside the current ones")
        if not wait:
            return Service(config, plan, cluster)
        _wait_placed(config.name, sorted(added), timeout_s, say, fresh=False)
    apply([*target["applications"], *keep_removed],
          "routing to the new configuration" if ingress_now else
          f"deploying {len(new_apps)} replica application(s) and the ingress")
    if not wait:
        return Service(config, plan, cluster)
    _wait_placed(config.name, [config.name, *sorted(new_apps)], timeout_s, say,
                 fresh=ingress_now is None)
    _wait_routing(config.name, target["applications"][0]["deployments"][0]["user_config"]
                  ["generation"], timeout_s)
    if removed:
        apply(list(target["applications"]), f"removing {len(removed)} replica application(s)")
        _wait_gone(sorted(removed), timeout_s)
    say(f"{config.name}: serving at {Service(config, plan, cluster).url}")
    return Service(config, plan, cluster)


def delete(name: str, *, timeout_s: float = 120.0) -> list[str]:
    """Remove a service's applications (the ingress and every replica application)."""
    from ray import serve

    if not re.match(NAME_PATTERN, name):
        raise ConfigError(f"{name!r} is not a service name")
    client = _client()
    if client is None:
        return []
    ours = sorted(_ours(client, name))
    if not ours:
        return []
    others = _others(client, name)
    if others:
        _apply(client, {"applications": others})
    else:
        for app in ours:
            serve.delete(app, _blocking=False)
    _wait_gone(ours, timeout_s)
    return ours


def service_status(name: str) -> dict[str, Any]:
    """Per application of service ``name``: status, message, replicas per deployment."""
    from ray import serve

    out = {}
    for app, s in serve.status().applications.items():
        if app == name or app.startswith(f"{name}."):
            out[app] = {"status": str(s.status.value if hasattr(s.status, "value") else
                                      s.status), "message": s.message,
                        "deployments": {d: {"status": str(getattr(ds.status, "value",
                                                                  ds.status)),
                                            "replicas": dict(ds.replica_states),
                                            "message": ds.message}
                                        for d, ds in s.deployments.items()}}
    return out


# ---- Serve plumbing -----------------------------------------------------------------------

def _start_serve(config: ServeConfig):
    from ray import serve

    http = config.http
    serve.start(http_options={"host": http.host, "port": http.port,
                              "request_timeout_s": http.request_timeout_s},
                proxy_location=http.proxy_location)
    return _client()


def _client():
    from ray.serve.context import _get_global_client

    try:
        return _get_global_client()
    except Exception:
        return None


def _details(client) -> dict[str, Any]:
    details = client.get_serve_details()
    return details.get("applications", {}) if isinstance(details, dict) else {}


def _ours(client, name: str) -> dict[str, dict[str, Any]]:
    out = {}
    for app, info in _details(client).items():
        if app == name or app.startswith(f"{name}."):
            cfg = info.get("deployed_app_config")
            if cfg:
                out[app] = _clean(cfg)
    return out


def _others(client, name: str) -> list[dict[str, Any]]:
    return [_clean(info["deployed_app_config"]) for app, info in _details(client).items()
            if not (app == name or app.startswith(f"{name}."))
            and info.get("deployed_app_config")]


def _clean(cfg: dict[str, Any]) -> dict[str, Any]:
    """A deployed application config as it can be applied again (defaults dropped)."""
    cfg = copy.deepcopy(cfg)
    return {k: v for k, v in cfg.items() if v is not None or k == "route_prefix"}


def _apply(client, schema: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    try:
        parsed = ServeDeploySchema.model_validate(schema)
    except Exception as e:
        raise ClusterError(f"Serve refused the generated config: {e}") from None
    client.deploy_apps(parsed)


def _wait(apps: list[str], timeout_s: float, say: Callable[[str], None]) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        statuses = serve.status().applications
        pending, failed = [], []
        for app in apps:
            s = statuses.get(app)
            if s is None:
                pending.append(f"{app}: not created yet")
                continue
            state = str(getattr(s.status, "value", s.status))
            if state == "DEPLOY_FAILED":
                failed.append(f"{app}: {s.message or ''} " + " ".join(
                    f"[{d}: {ds.message}]" for d, ds in s.deployments.items() if ds.message))
            elif state != "RUNNING" or any(
                    str(getattr(ds.status, "value", ds.status)) != "HEALTHY"
                    for ds in s.deployments.values()):
                detail = "; ".join(f"{d} {getattr(ds.status, 'value', ds.status)} "
                                   f"{dict(ds.replica_states)} {ds.message[:300]}".strip()
                                   for d, ds in s.deployments.items())
                pending.append(f"{app}: {state} ({detail})")
        if failed:
            raise ClusterError("Serve could not deploy: " + " | ".join(failed))
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"not running after {timeout_s:.0f}s: " + " | ".join(pending))
        line = pending[0]
        if line != last:
            say(f"  waiting: {line[:300]}")
            last = line
        time.sleep(0.5)


def _wait_placed(name: str, apps: list[str], timeout_s: float, say: Callable[[str], None],
                 *, fresh: bool) -> None:
    """``_wait``, reporting replicas that wait for resources (what holds their site) and
    giving up on them at ``$HYBRIDRAY_WAIT_TIMEOUT_S``. A service deployed fresh is removed
    again when it gives up, so no replica is left queued for resources behind the error."""
    from hybridray.exceptions import ResourceWaitTimeout
    from hybridray.waiting import waiting

    classes = tuple(f"ServeReplica:{app}:" for app in apps)
    try:
        with waiting(f"serve {name}", say=say,
                     match=lambda d: d.key.startswith(classes)):
            _wait(apps, timeout_s, say)
    except ResourceWaitTimeout as e:
        if not fresh:
            raise ResourceWaitTimeout(f"{e} (the update is left half-applied: run the "
                                      "previous file again to go back)") from None
        delete(name)
        raise ResourceWaitTimeout(f"{e} (service {name!r} was removed again)") from None


def _wait_routing(app: str, generation: str, timeout_s: float) -> None:
    """Until every running ingress replica of ``app`` routes by table ``generation``."""
    from ray import serve

    from hybridray.serve.plan import INGRESS

    handle = serve.get_deployment_handle(INGRESS, app_name=app)
    # A driver is not inside an asyncio loop; with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in its
    # environment Serve would build the handle for one and fail ("No event loop running").
    if not handle.is_initialized:   # Serve caches handles per process: set up once
        handle._init(_run_router_in_separate_loop=True)
    deadline = time.monotonic() + timeout_s
    seen: list = []
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        running = sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values()) \
            if status else 0
        try:
            seen = handle.broadcast("generation").results(timeout_s=10, return_exceptions=True)
        except Exception as e:  # replicas come and go while Serve updates them
            seen = [e]
        if running and len(seen) >= running and all(g == generation for g in seen):
            return
        time.sleep(0.25)
    raise ClusterError(f"{app}: ingress replicas did not apply routing table {generation} "
                       f"within {timeout_s:.0f}s (they report {seen})")


def _wait_gone(apps: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = set(serve.status().applications)
        if not live & set(apps):
            return
        time.sleep(0.5)
    raise ClusterError(f"applications still present after {timeout_s:.0f}s: "
                       f"{', '.join(sorted(set(apps) & set(serve.status().applications)))}")
