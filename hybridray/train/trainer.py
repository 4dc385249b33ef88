"""The driver side of a training run: decide everything, refuse early, then run Ray Train.

``train`` does, in order, before any worker starts: validate the config; read the class of
every input (the corpus and any checkpoint it starts from: a fine-tuned model inherits the
highest); place a ``train`` workload through the audited policy (refused → raise now);
check that the checkpoint site may hold that class and that its storage can be written; vet
the checkpoint a resumed run would load. Only then does it prepare the corpus (Ray Data, at
the data's site) and start ``TorchTrainer`` with one label selector per worker, checkpoints
in the site's storage and ``FailureConfig`` restarts. A small actor collects progress from
rank 0 for the console and for counting the steps a restart had to redo.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridray import labels as L
from hybridray.exceptions import ClusterError, HybridRayError, PlacementRefused, TrainError
from hybridray.storage.fs import parse_address, site_filesystem
from hybridray.topology.models import DataClass, Topology
from hybridray.train.config import TrainConfig, config_from_dict, load_train_config


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


@dataclass
class TrainResult:
    """What a finished run reports; ``to_dict()`` is JSON-ready."""

    name: str
    cluster: str
    steps: int
    checkpoint: str | None               # SITE:PATH of the latest checkpoint
    checkpoint_uri: str | None
    data_class: str
    worker_sites: list[str]              # as reported by the workers, in rank order
    workers_per_site: dict[str, int]
    planned_sites: list[str]             # what the placement assigned
    eval_history: list[list[float]]
    tokens_per_s: float | None
    mfu: float | None
    wan: dict[str, Any]
    attempts: list[dict[str, Any]]
    steps_redone: int
    elapsed_s: float
    corpus: str
    history: list[dict[str, Any]] = field(repr=False, default_factory=list)  # per log interval
    metrics: dict[str, Any] = field(repr=False, default_factory=dict)
    ray_result: Any = field(repr=False, default=None)

    @property
    def initial_eval_loss(self) -> float | None:
        return self.eval_history[0][1] if self.eval_history else None

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_history[-1][1] if self.eval_history else None

    @property
    def restarts(self) -> int:
        return max(0, len(self.attempts) - 1)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("ray_result", "metrics")}
        out.update(initial_eval_loss=self.initial_eval_loss,
                   final_eval_loss=self.final_eval_loss, restarts=self.restarts)
        return out


# ---- config and planning ------------------------------------------------------------------

def as_config(config: TrainConfig | str | os.PathLike | dict, overrides=()) -> TrainConfig:
    """A ``TrainConfig`` from a config, a YAML path or a dict, with ``key=value`` overrides."""
    if isinstance(config, TrainConfig):
        if not overrides:
            return config
        return config_from_dict(config.model_dump(mode="json"), overrides=overrides)
    if isinstance(config, dict):
        return config_from_dict(config, overrides=overrides)
    return load_train_config(config, overrides)


def plan_run(config: TrainConfig, cluster: Any) -> RunPlan:
    """Decide placement, classes and storage; raise before anything starts if refused.

    Raises:
        PlacementRefused: no site may (or can) run the workers, or the checkpoint site may
            not hold the data's class.
        TrainError: the storage root cannot be written, or a checkpoint to start from or
            resume is missing, corrupt or of another shape.
    """
    from hybridray.placement.workload import Workload, WorkloadKind
    from hybridray.train import checkpoint as ckpt
    from hybridray.train.model import GPTConfig

    topology: Topology = cluster.topology
    t = config.train
    data_addr = parse_address(config.data.output, topology)
    classes = {DataClass(config.data.data_class)}
    model_config = GPTConfig.named(config.model.size, **config.model.overrides())
    init = None
    if config.model.init_from:
        init = _resolve_checkpoint(config.model.init_from, topology)
        meta, init_config, state = ckpt.inspect_checkpoint(init["uri"])
        classes.add(DataClass(meta["data_class"]))
        model_config = init_config.model_copy(update={"dropout": config.model.dropout})
        init.update(data_class=meta["data_class"], step=state["step"])
    data_class = max(classes)

    def workload(count: int) -> Workload:
        return Workload(name=config.name, kind=WorkloadKind.train, count=count,
                        cpus=t.cpus_per_worker, gpus=t.gpus_per_worker,
                        accelerator=t.accelerator, data_classes=tuple(sorted(classes)),
                        data_site=data_addr.site, preference=t.preference, site=t.site,
                        burst=t.burst, spot_ok=t.spot_ok, expected_hours=1.0)

    placement = cluster.place(workload(t.max_workers))
    if not placement.ok and t.min_workers < t.max_workers and placement.refusal.rule == \
            "capacity":
        placement = cluster.place(workload(t.min_workers))
    placement.raise_if_refused()

    storage_site = config.checkpoint.site or data_addr.site
    if storage_site not in topology.sites:
        raise TrainError(f"checkpoint.site {storage_site!r}: no such site in cluster "
                         f"{topology.name!r} (sites: {', '.join(topology.sites)})")
    site = topology.sites[storage_site]
    if not site.may_hold(data_class):
        raise PlacementRefused(
            f"{config.name}: checkpoints inherit the data's class {data_class.value}, and "
            f"site {storage_site!r} may hold up to {site.max_data_class.value}",
            rule="residency", fix="set checkpoint.site to a site allowed for "
            f"{data_class.value}: {', '.join(topology.sites_by_class[data_class])}")
    fs, base = site_filesystem(site)
    storage_path = f"{base}/{config.checkpoint.path.strip('/')}" if base else \
        config.checkpoint.path.strip("/")
    storage_uri = f"{site.storage.root.rstrip('/')}/{config.checkpoint.path.strip('/')}"
    _check_writable(fs, storage_path, storage_uri, storage_site)

    run_name = config.name if t.resume == "auto" else \
        f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume_step = _vet_resume(fs, f"{storage_path}/{run_name}", model_config, data_class)
    return RunPlan(run_name=run_name, data_class=data_class, placement=placement,
                   model_config=model_config.model_dump(), storage_site=storage_site,
                   storage_path=storage_path, storage_uri=storage_uri, storage_fs=fs,
                   init_from=init, resume_step=resume_step)


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


def _vet_resume(fs: Any, run_dir: str, model_config: Any, data_class: DataClass
                ) -> int | None:
    """The step a resumed run continues from (None: fresh), after checking its checkpoint
    fits this run: same model shape, a class no higher than this run's."""
    import pyarrow.fs as pafs

    from hybridray.train import checkpoint as ckpt

    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError:
        return None
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint-")), reverse=True)
    for path in dirs:
        reader = ckpt.CheckpointReader(path, fs)
        try:
            reader.check_complete()
        except TrainError:
            continue      # a checkpoint whose upload was cut short; Ray never registered it
        meta, have, state = ckpt.inspect_checkpoint(reader)
        ckpt.check_same_shape(have, model_config, reader)
        if DataClass(meta["data_class"]) > data_class:
            raise TrainError(f"{reader.where(ckpt.META_FILE)}: the run's checkpoints are "
                             f"{meta['data_class']}, above this run's {data_class.value}; "
                             "start a new run (train.resume=never, or another name)")
        return state["step"]
    return None


# ---- running ------------------------------------------------------------------------------

class _Board:
    """Actor rank 0 reports progress to; the driver polls it (also across restarts)."""

    def __init__(self):
        self.attempts: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.step = 0

    def start(self, step: int, resumed: bool, sites: list[str]) -> None:
        self.attempts.append({"start_step": step, "max_step": step, "resumed": resumed,
                              "sites": sites, "started_at": time.time()})
        self.step = step

    def step_done(self, step: int) -> None:
        self.step = step
        if self.attempts:
            self.attempts[-1]["max_step"] = max(self.attempts[-1]["max_step"], step)

    def log(self, metrics: dict[str, Any]) -> None:
        self.logs.append(metrics)

    def poll(self, since: int) -> dict[str, Any]:
        return {"attempts": self.attempts, "logs": self.logs[since:], "step": self.step}


def build_trainer(config: TrainConfig, plan: RunPlan, corpus: Any, cluster: Any,
                  board: Any = None):
    """The ``TorchTrainer`` for a planned run (per-worker label selectors, site storage)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from hybridray.placement import compile as C
    from hybridray.train.loop import train_loop_per_worker

    t = config.train
    resources = {"CPU": t.cpus_per_worker}
    if t.gpus_per_worker:
        resources["GPU"] = t.gpus_per_worker
    selectors = C.train_label_selectors(plan.placement, t.max_workers)
    if t.accelerator:
        selectors = [{**s, L.ACCELERATOR: t.accelerator} for s in selectors]
    if isinstance(t.workers, tuple):
        scaling = ray.train.ScalingConfig(
            num_workers=t.workers, use_gpu=t.gpus_per_worker > 0,
            resources_per_worker=resources, label_selector=selectors,
            placement_strategy=t.placement_strategy,
            elastic_resize_monitor_interval_s=t.elastic_resize_interval_s)
    else:
        scaling = C.scaling_config(plan.placement, t.workers, resources_per_worker=resources,
                                   placement_strategy=t.placement_strategy)
        scaling.label_selector = selectors
    spec = {
        "config": config.model_dump(mode="json"),
        "topology": cluster.topology.model_dump(mode="json"),
        "model_config": plan.model_config,
        "data_class": plan.data_class.value,
        "corpus": corpus.data, "corpus_address": str(corpus.address),
        "init_from": plan.init_from, "run_name": plan.run_name, "cluster": cluster.name,
        "board": board,
    }
    callbacks = [_restart_placement(C.site_selector(plan.placement, plan.placement.sites[0]),
                                    plan.placement.sites)] if t.replace_on_restart else []
    run_config = ray.train.RunConfig(
        name=plan.run_name, storage_path=plan.storage_path,
        storage_filesystem=plan.storage_fs, callbacks=callbacks,
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints))
    return TorchTrainer(train_loop_per_worker, train_loop_config=spec, scaling_config=scaling,
                        run_config=run_config,
                        torch_config=TorchConfig(backend="nccl" if t.gpus_per_worker else "gloo"))


def _restart_placement(selector: dict[str, str], sites: list[str]):
    """A controller callback: the first worker group keeps the per-worker selectors of the
    placement; every restart may use any site the placement allowed (the data-class pin
    stays), so losing the nodes of one site does not leave the run waiting for them."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    anywhere = {**selector, L.SITE: f"in({','.join(sites)})"}

    class RestartAtAllowedSites(ControllerCallback):
        def __init__(self):
            self.starts = 0

        def on_controller_start_worker_group(self, *, scaling_config, num_workers):
            self.starts += 1
            return None if self.starts == 1 else dict(anywhere)

    return RestartAtAllowedSites()


def train(config: TrainConfig | str | os.PathLike | dict, cluster: Any = None, *,
          overrides: list[str] | tuple[str, ...] = (), progress: bool | None = None
          ) -> TrainResult:
    """Train a byte-level GPT on a hybridray cluster, placed by policy.

    Args:
        config: a ``TrainConfig``, a YAML path (``configs/train/*.yaml``) or a dict.
        cluster: a connected ``hybridray.Cluster``; default ``hybridray.connect(config.cluster)``.
        overrides: ``key.sub=value`` strings applied before validation.
        progress: show the live console display (default: ``metrics.progress``).

    Returns:
        A ``TrainResult``: checkpoint address, worker-reported sites, eval history, tokens/s,
        MFU, bytes per step across sites, restarts and steps redone.

    Raises:
        ConfigError: the config is invalid (every problem, with file and key).
        PlacementRefused: refused before any worker starts (no site may hold the data, or
            none can run the workers, or the checkpoint site may not hold its class).
        TrainError: bad checkpoint, unwritable storage, or the run failed (the cause named).
    """
    import ray

    from hybridray.api import connect
    from hybridray.train.corpus import prepare_corpus

    config = as_config(config, overrides)
    if cluster is None:
        cluster = connect(config.cluster)
    elif not ray.is_initialized():
        raise ClusterError("the cluster is not connected; use hybridray.connect(NAME)")
    show = config.metrics.progress if progress is None else progress
    started = time.time()
    plan = plan_run(config, cluster)
    cluster.audit.record("train-start", cluster=cluster.name, run=plan.run_name,
                         data_class=plan.data_class.value, sites=plan.placement.assign(
                             config.train.max_workers), storage=plan.storage_uri,
                         resume_step=plan.resume_step, wan=config.wan.mode)
    corpus = prepare_corpus(config.data, cluster.topology, cluster=cluster, name=config.name,
                            progress=show)
    board = ray.remote(num_cpus=0)(_Board).options(
        scheduling_strategy=_head_node(), name=f"hybridray-train-{uuid.uuid4().hex[:8]}").remote()
    trainer = build_trainer(config, plan, corpus, cluster, board)
    display = _Display(board, config, plan) if show else None
    try:
        if display:
            display.start()
        try:
            result = trainer.fit()
        except Exception as e:
            raise _explain(e, plan) from None
        finally:
            if display:
                display.stop()
        try:
            state = ray.get(board.poll.remote(0), timeout=30)
        except Exception:  # the run finished; only its progress record is lost
            state = {"attempts": [], "logs": [], "step": 0}
    finally:
        ray.kill(board)
    out = _result(config, plan, corpus, cluster, result, state, time.time() - started)
    _audit(cluster, out, plan)
    return out


def _head_node():
    """Keep the progress board on the head (it outlives any worker node), else here."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive")
                 and (n.get("Labels") or {}).get(L.ROLE) == "head"),
                ray.get_runtime_context().get_node_id())
    return NodeAffinitySchedulingStrategy(head, soft=True)


def _explain(error: Exception, plan: RunPlan) -> Exception:
    """A ``HybridRayError`` for a failed ``fit()``, naming the worker's own error."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, HybridRayError):
            return cause
        text = str(failure).strip().splitlines()
        for line in reversed(text):
            if "Error" in line or "Violation" in line:
                return TrainError(f"{plan.run_name}: worker rank {rank} failed: {line.strip()}")
    if isinstance(error, HybridRayError):
        return error
    first = str(error).strip().splitlines()
    return TrainError(f"{plan.run_name}: training failed: "
                      f"{first[-1] if first else type(error).__name__}")


def _result(config: TrainConfig, plan: RunPlan, corpus: Any, cluster: Any, result: Any,
            state: dict[str, Any], elapsed: float) -> TrainResult:
    m = dict(result.metrics or {})
    address = uri = None
    if result.checkpoint is not None:
        rel = result.checkpoint.path
        root = site_filesystem(cluster.topology.sites[plan.storage_site])[1]
        if root and rel.startswith(root + "/"):
            rel = rel[len(root) + 1:]
        address = f"{plan.storage_site}:{rel}"
        uri = f"{cluster.topology.sites[plan.storage_site].storage.root.rstrip('/')}/{rel}"
    logs = [x for x in state["logs"] if x.get("tokens_per_s")]
    steady = logs[1:] or logs                # the first window includes compile/warm-up
    tps = sum(x["tokens_per_s"] for x in steady) / len(steady) if steady else None
    mfu = sum(x["mfu"] for x in steady) / len(steady) if steady else None
    attempts = state["attempts"]
    redone = sum(max(0, prev["max_step"] - cur["start_step"])
                 for prev, cur in zip(attempts, attempts[1:]))
    wan_keys = ("wan_mode", "comm_bytes_per_step", "comm_bytes_per_step_all_ranks",
                "baseline_comm_bytes_per_step", "cross_site_bytes_per_step",
                "baseline_cross_site_bytes_per_step", "comm_reduction")
    last_wan = next((x for x in reversed(logs) if "wan_mode" in x), m)
    sites = m.get("worker_sites", [])
    return TrainResult(
        name=plan.run_name, cluster=cluster.name, steps=int(m.get("step", 0)),
        checkpoint=address, checkpoint_uri=uri, data_class=plan.data_class.value,
        worker_sites=sites, workers_per_site=dict(Counter(sites)),
        planned_sites=plan.placement.assign(config.train.max_workers),
        eval_history=m.get("eval_history", []), tokens_per_s=tps, mfu=mfu,
        wan={k: last_wan.get(k) for k in wan_keys}, attempts=attempts, steps_redone=redone,
        elapsed_s=round(elapsed, 3), corpus=str(corpus.address), history=state["logs"],
        metrics=m, ray_result=result)


def _audit(cluster: Any, out: TrainResult, plan: RunPlan) -> None:
    """Record the run, and the bytes it sent between sites, in the cluster's audit log."""
    from hybridray.train.wan import cross_site_links, ring_edge_bytes

    topo = cluster.topology
    cluster.audit.record("train-end", cluster=cluster.name, run=out.name, steps=out.steps,
                         checkpoint=out.checkpoint, data_class=out.data_class,
                         worker_sites=out.worker_sites, restarts=out.restarts,
                         steps_redone=out.steps_redone, final_eval_loss=out.final_eval_loss)
    data_site = out.corpus.split(":", 1)[0]
    for site, nbytes in zip(out.worker_sites, out.metrics.get("bytes_read", [])):
        if site != data_site and nbytes:
            cluster.audit.transfer(data_site, site, nbytes, topo.egress_cost(
                data_site, site, nbytes), run=out.name, what="corpus shards")
    payload = out.wan.get("comm_bytes_per_step_all_ranks") or 0
    steps = out.steps - (out.attempts[0]["start_step"] if out.attempts else 0) + out.steps_redone
    edge = ring_edge_bytes(payload, len(out.worker_sites)) * max(steps, 0)
    for (src, dst), n in cross_site_links(out.worker_sites).items():
        nbytes = int(edge * n)
        if nbytes:
            cluster.audit.transfer(src, dst, nbytes, topo.egress_cost(src, dst, nbytes),
                                   run=out.name, what=f"gradients ({out.wan.get('wan_mode')}, "
                                                       "ring estimate)")


class _Display:
    """Live console view: a step bar plus one line per log interval, fed by the board."""

    def __init__(self, board: Any, config: TrainConfig, plan: RunPlan):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
            TimeElapsedColumn, TimeRemainingColumn

        self.board, self.config, self.plan = board, config, plan
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console, transient=False)
        self.task = self.progress.add_task(plan.run_name, total=config.train.steps, info="")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="train-display")
        self._seen_logs = 0
        self._seen_attempts = 0

    def start(self) -> None:
        sites = Counter(self.plan.placement.assign(self.config.train.max_workers))
        self.console.print(f"[bold]{self.plan.run_name}[/]: {self.config.model.size} GPT, "
                           f"{self.plan.data_class.value} data, workers "
                           + ", ".join(f"{s}×{n}" for s, n in sites.items())
                           + f", wan {self.config.wan.mode}, checkpoints "
                             f"{self.plan.storage_uri}/{self.plan.run_name}")
        self.progress.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()
        self.progress.stop()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._poll()
            except Exception:  # the display must never take the run down
                pass

    def _poll(self) -> None:
        import ray

        state = ray.get(self.board.poll.remote(self._seen_logs), timeout=10)
        for attempt in state["attempts"][self._seen_attempts:]:
            if attempt["resumed"]:
                self.console.print(f"[yellow]restarted[/] from the checkpoint at step "
                                   f"{attempt['start_step']} on "
                                   + ", ".join(f"{s}×{n}" for s, n in
                                               Counter(attempt["sites"]).items()))
        self._seen_attempts = len(state["attempts"])
        for m in state["logs"]:
            self.console.print(_log_line(m))
        self._seen_logs += len(state["logs"])
        info = ""
        if state["logs"]:
            m = state["logs"][-1]
            info = f"loss {m['loss']:.3f}  {m['tokens_per_s']:,.0f} tok/s"
        self.progress.update(self.task, completed=state["step"], info=info)


def _log_line(m: dict[str, Any]) -> str:
    sites = ", ".join(f"{s}×{n}" for s, n in m.get("workers_per_site", {}).items())
    comm = m.get("comm_bytes_per_step") or 0
    return (f"step {m['step']:>6}/{m['steps']}  loss {m['loss']:.4f}  eval "
            f"{m['eval_loss']:.4f}@{m.get('eval_step', '?')}  {m['tokens_per_s']:>8,.0f} tok/s  MFU "
            f"{100 * m['mfu']:5.2f}%  lr {m['lr']:.2e}  {sites}  wan {m.get('wan_mode')} "
            f"{comm / 1e6:.2f} MB/step ({(m.get('cross_site_bytes_per_step') or 0) / 1e6:.2f} "
            "MB across sites)")
