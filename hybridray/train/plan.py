"""Everything a training run decides on the driver, before a single worker starts.

Refusing late is expensive (workers started, data read, maybe by the wrong site), so the
plan checks up front: the class of every input (the corpus, and a checkpoint the run starts
from: a fine-tuned model inherits the highest), the placement of the worker group through
the audited policy, the checkpoint site's right to hold that class, that its storage can be
written, and that a checkpoint the run would resume from fits the model. The result is a
``RunPlan``: plain data that ``build_trainer`` turns into Ray Train's configs.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridray.exceptions import PlacementRefused, TrainError
from hybridray.storage.fs import parse_address, site_filesystem
from hybridray.topology.models import DataClass, Topology
from hybridray.train.config import TrainConfig
from hybridray.train.kinds import (
    CustomKind,
    CustomModelConfig,
    GPTKind,
    ModelKind,
    factory_name,
    resolve_factory,
    ship_by_value,
)


@dataclass
class RunPlan:
    """Everything decided on the driver before a worker starts (plain data, auditable)."""

    run_name: str
    data_class: DataClass
    placement: Any                       # hybridray.placement.Placement
    model_config: dict[str, Any]
    storage_site: str
    storage_path: str                    # inside storage_fs
    storage_uri: str
    storage_fs: Any = field(repr=False)
    init_from: dict[str, Any] | None = None
    resume_step: int | None = None
    model_name: str = "GPT"              # for the console: "tiny GPT", "model pkg.mod:build"
    model_fn: Any = field(repr=False, default=None)   # a factory passed from Python, or None


def plan_run(config: TrainConfig, cluster: Any, model_fn: Any = None) -> RunPlan:
    """Decide placement, classes and storage; raise before anything starts if refused.

    ``model_fn`` is a model factory passed from Python (``train(config, model=fn)``); else
    ``model.factory`` names one, else the run trains the built-in GPT.

    Raises:
        PlacementRefused: no site may (or can) run the workers, or the checkpoint site may
            not hold the data's class.
        TrainError: the storage root cannot be written, a model factory cannot be imported
            or built, or a checkpoint to start from or resume is missing, corrupt or of
            another shape.
    """
    from hybridray.placement.workload import Workload, WorkloadKind
    from hybridray.train import checkpoint as ckpt
    from hybridray.train.model import GPTConfig

    topology: Topology = cluster.topology
    t = config.train
    data_addr = parse_address(config.data.output, topology)
    classes = {DataClass(config.data.data_class or topology.default_data_class)}
    kind = _model_kind(config, model_fn)
    init = None
    if config.model.init_from:
        init = _resolve_checkpoint(config.model.init_from, topology)
        meta, init_config, state = ckpt.inspect_checkpoint(
            init["uri"], **_signing(cluster, topology))
        classes.add(DataClass(meta["data_class"]))
        if isinstance(kind, GPTKind) and isinstance(init_config, GPTConfig):
            kind = GPTKind(init_config.model_copy(update={"dropout": config.model.dropout}))
        ckpt.check_fits(ckpt.CheckpointReader(init["uri"]), init_config, kind)
        init.update(data_class=meta["data_class"], step=state["step"])
    data_class = max(classes)

    def workload(count: int) -> Workload:
        return Workload(name=config.name, kind=WorkloadKind.train, count=count,
                        cpus=t.cpus_per_worker, gpus=t.gpus_per_worker,
                        accelerator=t.accelerator, data_classes=tuple(sorted(classes)),
                        data_site=data_addr.site, preference=t.preference, site=t.site,
                        burst=t.burst, spot_ok=t.spot_ok, expected_hours=1.0,
                        queue=t.queue)

    # A run starts from what Ray has free now (not the snapshot a busy driver decides with).
    placement = cluster.place(workload(t.max_workers), max_age_s=0)
    if not placement.ok and t.min_workers < t.max_workers and placement.refusal.rule == \
            "capacity":
        placement = cluster.place(workload(t.min_workers), max_age_s=0)
    placement.raise_if_refused()
    if t.min_workers < t.max_workers:
        _check_elastic(config, topology, data_class)

    storage_site = config.checkpoint.site or data_addr.site
    if storage_site not in topology.sites:
        raise TrainError(f"checkpoint.site {storage_site!r}: no such site in cluster "
                         f"{topology.name!r} (sites: {', '.join(topology.sites)})")
    site = topology.sites[storage_site]
    if not site.may_hold(data_class):
        refusal = PlacementRefused(
            f"{config.name}: checkpoints inherit the data's class {data_class.value}, and "
            f"site {storage_site!r} may hold up to {site.max_data_class.value}",
            rule="residency", fix="set checkpoint.site to a site allowed for "
            f"{data_class.value}: {', '.join(topology.sites_by_class[data_class])}")
        cluster.audit.refusal(refusal, what="train checkpoint", workload=config.name,
                              site=storage_site, data_class=data_class.value,
                              cluster=topology.name)
        raise refusal
    fs, base = site_filesystem(site)
    storage_path = f"{base}/{config.checkpoint.path.strip('/')}" if base else \
        config.checkpoint.path.strip("/")
    storage_uri = f"{site.storage.root.rstrip('/')}/{config.checkpoint.path.strip('/')}"
    _check_writable(fs, storage_path, storage_uri, storage_site)

    run_name = config.name if t.resume != "never" else \
        f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume_step = _vet_resume(fs, f"{storage_path}/{run_name}", kind, data_class, config,
                              f"{storage_site}:{config.checkpoint.path.strip('/')}/{run_name}",
                              _signing(cluster, topology))
    name = f"{config.model.size} GPT" if isinstance(kind, GPTKind) and not init else kind.label
    return RunPlan(run_name=run_name, data_class=data_class, placement=placement,
                   model_config=kind.config.model_dump(), storage_site=storage_site,
                   storage_path=storage_path, storage_uri=storage_uri, storage_fs=fs,
                   init_from=init, resume_step=resume_step, model_name=name,
                   model_fn=getattr(kind, "fn", None))


def _model_kind(config: TrainConfig, model_fn: Any) -> ModelKind:
    """The run's model, built once on the meta device here so a factory that cannot be
    imported, fails, or returns no module is refused before any worker starts."""
    from hybridray.train.model import GPTConfig

    m = config.model
    if model_fn is None and m.factory is None:
        return GPTKind(GPTConfig.named(m.size, **m.overrides()))
    if model_fn is not None and not callable(model_fn):
        raise TrainError(f"model={model_fn!r}: pass a callable that returns a "
                         "torch.nn.Module (or set model.factory in the config)")
    if model_fn is not None and m.factory is not None:
        raise TrainError(f"model.factory={m.factory} and a model= callable were both given; "
                         "pass one")
    block = m.block_size or GPTConfig.named(m.size).block_size
    fn = model_fn or resolve_factory(m.factory)
    ship_by_value(fn)
    kind = CustomKind(CustomModelConfig(factory=m.factory or factory_name(fn),
                                        kwargs=m.kwargs, block_size=block), fn)
    kind.expected_shapes()
    return kind


def _resolve_checkpoint(location: str, topology: Topology) -> dict[str, Any]:
    """``{"uri", "site"}`` for SITE:PATH, a URI or a local directory."""
    if "://" not in location and ":" in location and not location.startswith("/"):
        addr = parse_address(location, topology)
        return {"uri": addr.uri(topology), "site": addr.site, "address": str(addr)}
    path = location if "://" in location else "file://" + str(Path(location).absolute())
    return {"uri": path, "site": None, "address": location}


def _check_writable(fs: Any, path: str, uri: str, site: str) -> None:
    probe = f"{path}/.hybridray-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # pyarrow raises OSError, PermissionError, or ArrowException
        raise TrainError(f"checkpoint storage {uri} (site {site}) cannot be written: "
                         f"{str(e).splitlines()[0]}; fix sites.{site}.storage.root or "
                         "checkpoint.path") from None


def _check_elastic(config: Any, topology: Any, data_class: DataClass) -> None:
    """An elastic group only where Ray's sizing cannot count nodes its workers may not use.

    Ray 2.60's elastic policy sizes the group from the free resources of *every* node; the
    per-worker label selectors are applied only when the workers are placed. With a site
    excluded (by the data's class, a pinned site or an accelerator) it would pick a size the
    allowed sites cannot hold and wait for those workers forever.
    """
    t = config.train
    allowed = topology.sites_by_class[data_class]
    excluded = [s for s in topology.sites if s not in allowed]
    why = (f"{data_class.value} data may not train at {', '.join(excluded)}" if excluded else
           f"train.site={t.site} pins the group to one site" if t.site else
           f"train.accelerator={t.accelerator} excludes nodes without it" if t.accelerator
           else None)
    if why:
        raise TrainError(
            f"{config.name}: train.workers=[{t.min_workers}, {t.max_workers}] (elastic) needs "
            f"every node of the cluster usable, and {why}: Ray's elastic policy sizes the group "
            "from free resources on all nodes and would wait for workers that cannot be "
            f"placed. Use a fixed train.workers (e.g. {t.min_workers})")


def _signing(cluster: Any, topology: Topology) -> dict[str, Any]:
    """The cluster's checkpoint signing key and default class, for ``inspect_checkpoint``."""
    from hybridray.storage.secrets import ClusterSecrets

    home = getattr(getattr(cluster, "state", None), "home", None)
    return {"signing_key": ClusterSecrets(topology.name, home).signing_key(),
            "default_class": topology.default_data_class.value}


def _vet_resume(fs: Any, run_dir: str, kind: ModelKind, data_class: DataClass,
                config: TrainConfig, address: str,
                signing: dict[str, Any] | None = None) -> int | None:
    """The step a resumed run continues from (None: fresh), after checking its checkpoint
    fits this run (same model shape, a class no higher than this run's) and that resuming is
    what the config asks for: a checkpoint at or past ``train.steps`` would train nothing,
    and one trained with another WAN mode, precision or model would quietly continue as
    something else. Those are refused with the choices, unless ``train.resume: always``
    (``--resume``) accepts changed settings."""
    from hybridray.train import checkpoint as ckpt
    from hybridray.train.kinds import CustomModelConfig

    t = config.train
    for reader in ckpt.complete_checkpoints(fs, run_dir):
        meta, have, state = ckpt.inspect_checkpoint(reader, **(signing or {}))
        here = f"{address}/{reader.path.rsplit('/', 1)[-1]}"
        choices = (f"--new-run (a new run, {config.name}-YYYYmmdd-HHMMSS, from scratch; "
                   f"train.resume=never), or name=OTHER (a run of its own)")
        try:
            ckpt.check_fits(reader, have, kind)
        except TrainError as e:
            raise TrainError(f"run {config.name!r} cannot resume its checkpoint: "
                             f"{str(e).split('; ', 1)[0]}. Choose: set model.* to match it, "
                             f"{choices}") from None
        if DataClass(meta["data_class"]) > data_class:
            raise TrainError(f"{reader.where(ckpt.META_FILE)}: the run's checkpoints are "
                             f"{meta['data_class']}, above this run's {data_class.value}; "
                             f"start a new run: {choices}")
        step = int(state["step"])
        was = {"WAN mode": state.get("wan_mode"), "precision": state.get("precision")}
        now = {"WAN mode": config.wan.mode, "precision": t.precision}
        if isinstance(have, CustomModelConfig) and have.factory != kind.config.factory:
            was["model"], now["model"] = have.factory, kind.config.factory
        changed = [f"{k} {was[k]} → {now[k]}" for k in was
                   if was[k] is not None and was[k] != now[k]]
        if step >= t.steps:
            raise TrainError(
                f"run {config.name!r} already has a checkpoint at step {step} ({here}) and "
                f"this config asks for train.steps={t.steps}: resuming would train nothing"
                + (f" (and it was trained with {', '.join(changed)})" if changed else "")
                + f". Choose: {choices}, or continue it with --resume and train.steps above "
                f"{step}")
        if changed and t.resume != "always":
            raise TrainError(
                f"run {config.name!r} has a checkpoint at step {step} ({here}) trained with "
                f"other settings than this config asks for ({', '.join(changed)}). Choose: "
                f"--resume (continue it from step {step} with the new settings; "
                f"train.resume=always), {choices}")
        return step
    return None
