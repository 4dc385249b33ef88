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
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hybridray import labels as L
from hybridray.exceptions import ClusterError, HybridRayError, TrainError
from hybridray.storage.fs import site_filesystem
from hybridray.train.config import TrainConfig, config_from_dict, load_train_config
from hybridray.train.plan import RunPlan, plan_run
from hybridray.train.progress import Board, Display, Watcher, driver_node_strategy
from hybridray.waiting import waiting

__all__ = ["RunPlan", "TrainResult", "as_config", "build_trainer", "plan_run", "train"]


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
    tokens_per_s: float | None           # steady: log windows after the first, steps only
    mfu: float | None
    wan: dict[str, Any]
    attempts: list[dict[str, Any]]
    steps_redone: int
    elapsed_s: float
    corpus: str
    progress_error: str | None = None    # set when the progress record may be incomplete
    # the last attempt, first step to last checkpoint committed (logs, evals, checkpoints in)
    end_to_end_tokens_per_s: float | None = None
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


def as_config(config: TrainConfig | str | os.PathLike | dict, overrides=()) -> TrainConfig:
    """A ``TrainConfig`` from a config, a YAML path or a dict, with ``key=value`` overrides."""
    if isinstance(config, TrainConfig):
        if not overrides:
            return config
        return config_from_dict(config.model_dump(mode="json"), overrides=overrides)
    if isinstance(config, dict):
        return config_from_dict(config, overrides=overrides)
    return load_train_config(config, overrides)


def build_trainer(config: TrainConfig, plan: RunPlan, corpus: Any, cluster: Any,
                  board: Any = None):
    """The ``TorchTrainer`` for a planned run (per-worker label selectors, site storage)."""
    import ray.train
    from ray._private.ray_constants import RAY_WORKER_NICENESS
    from ray.train.torch import TorchConfig

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
        "model_fn": plan.model_fn,           # a factory passed from Python (cloudpickled)
        "data_class": plan.data_class.value,
        "corpus": corpus.data, "corpus_address": str(corpus.address),
        "init_from": plan.init_from, "run_name": plan.run_name, "cluster": cluster.name,
        "board": board,
        # Signs each checkpoint's hybridray.json in the workers (which run only at sites
        # allowed for the data's class, like the data's own keys).
        "meta_key": _signing_key(cluster).hex(),
    }
    callbacks = [_restart_placement(C.site_selector(plan.placement, plan.placement.sites[0]),
                                    plan.placement.sites)] if t.replace_on_restart else []
    run_config = ray.train.RunConfig(
        name=plan.run_name, storage_path=plan.storage_path,
        storage_filesystem=plan.storage_fs, callbacks=callbacks,
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
        # Ray nices every worker to 15 (RAY_worker_niceness, applied by the worker itself);
        # train.worker_niceness (default 0) keeps the ranks at the raylet's priority.
        worker_runtime_env={"env_vars": {RAY_WORKER_NICENESS: str(t.worker_niceness)}})
    return _trainer_class()(
        train_loop_per_worker, train_loop_config=spec, scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if t.gpus_per_worker else "gloo"))


def _trainer_class():
    """``TorchTrainer`` whose Ctrl-C stops the run *and* the caller.

    Ray Train's ``fit()`` installs a SIGINT handler of its own and never puts the previous
    one back: the first Ctrl-C aborts the run and ``fit()`` returns as if all went well (the
    CLI exited 0), and every later Ctrl-C in that process (a test run, a notebook) goes to
    the handler of a run long finished. Ray installs it in ``_initialize_and_run_controller``,
    replaced here by ``_run_controller``, which installs none: the caller's handler stays
    (Python's default raises ``KeyboardInterrupt``); ``train`` then aborts the run (``_fit``).
    """
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        controller = None                     # set by _run_controller

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            return _run_controller(self, controller_init_kwargs)

        def _create_default_callbacks(self):
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
            from ray.train.v2._internal.callbacks.placement_group_callback import (
                PlacementGroupCleanerCallback,
            )

            from hybridray.train.controller import DatasetsOnlyWhenGiven

            # No PlacementGroupCleaner: ``train`` removes the run's groups itself
            # (``remove_placement_groups``), pending ones included.
            return [DatasetsOnlyWhenGiven(train_run_context=self.train_run_context,
                                          datasets=self.datasets)
                    if type(c) is DatasetsCallback else c
                    for c in super()._create_default_callbacks()
                    if type(c) is not PlacementGroupCleanerCallback]

    return Trainer


def _run_controller(trainer: Any, init_kwargs: dict[str, Any]) -> Any:
    """Ray Train's ``DataParallelTrainer._initialize_and_run_controller`` with hybridray's
    controller (``train/controller.py``: a checkpoint commits as soon as a worker waits for
    it): the same actor options (0 CPUs, on the driver's node, Ray Train's environment)."""
    import ray
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        get_env_vars_to_propagate,
    )

    from hybridray.train.controller import PromptCommitController

    env_vars = get_env_vars_to_propagate()
    env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    node = ray.get_runtime_context().get_node_id()
    controller = ray.remote(num_cpus=0, label_selector={ray._raylet.RAY_NODE_ID_KEY: node},
                            runtime_env={"env_vars": env_vars})(PromptCommitController) \
        .remote(**init_kwargs)
    trainer.controller = controller          # from any thread: the driver cleans up after it
    ray.get(controller.run.remote())
    return ray.get(controller.get_result.remote())


def _fit(trainer: Any) -> Any:
    """``trainer.fit()``; on Ctrl-C the run is aborted (workers stopped) before re-raising,
    and the SIGINT handler is what it was before, in every case."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        _abort(trainer.controller)
        raise
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def _abort(controller: Any, timeout: float = 30.0) -> None:
    """Stop an interrupted run: Ray Train's own abort (it stops the worker group), then the
    controller itself; bounded, so a second Ctrl-C is never needed."""
    import ray

    if controller is None:
        return
    try:
        ray.get(controller.abort.remote(), timeout=timeout)
    except Exception:
        pass
    try:
        ray.kill(controller, no_restart=True)
    except Exception:
        pass


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


def _signing_key(cluster: Any) -> bytes:
    from hybridray.storage.secrets import ClusterSecrets

    home = getattr(getattr(cluster, "state", None), "home", None)
    return ClusterSecrets(cluster.name, home).signing_key()


def with_default_class(config: TrainConfig, topology: Any) -> TrainConfig:
    """``config`` with ``data.data_class`` set to the cluster's ``default_data_class`` when
    the config declares none: one rule for undeclared data in workloads, sync and training."""
    if config.data.data_class is not None:
        return config
    data = config.data.model_copy(update={"data_class": topology.default_data_class})
    return config.model_copy(update={"data": data})


def train(config: TrainConfig | str | os.PathLike | dict, cluster: Any = None, *,
          overrides: list[str] | tuple[str, ...] = (), progress: bool | None = None,
          model: Any = None) -> TrainResult:
    """Train a byte-level language model (the built-in GPT, or yours) on a hybridray
    cluster, placed by policy.

    Args:
        config: a ``TrainConfig``, a YAML path (``configs/train/*.yaml``) or a dict.
        cluster: a connected ``hybridray.Cluster``; default ``hybridray.connect(config.cluster)``.
        overrides: ``key.sub=value`` strings applied before validation.
        progress: show the live console display (default: ``metrics.progress``).
        model: your own model instead of the GPT: a callable returning a ``torch.nn.Module``
            that maps byte ids ``(B, T)`` to logits ``(B, T, 256)``; it is called on every
            worker with ``model.kwargs`` (see ``hybridray.train.kinds``).

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
    config = with_default_class(config, cluster.topology)
    plan = plan_run(config, cluster, model_fn=model)
    cluster.audit.record("train-start", cluster=cluster.name, run=plan.run_name,
                         data_class=plan.data_class.value, sites=plan.placement.assign(
                             config.train.max_workers), storage=plan.storage_uri,
                         resume_step=plan.resume_step, wan=config.wan.mode)
    with waiting(f"train {plan.run_name}: corpus"):
        corpus = prepare_corpus(config.data, cluster.topology, cluster=cluster,
                                name=config.name, progress=show, queue=config.train.queue)
    board = ray.remote(num_cpus=0)(Board).options(
        scheduling_strategy=driver_node_strategy(),
        name=f"hybridray-train-{uuid.uuid4().hex[:8]}").remote()
    trainer = build_trainer(config, plan, corpus, cluster, board)
    display = Display(config, plan) if show else None
    # without a console view the record is only read at the end: poll it less often (the
    # board lives on the driver's node, so it outlives any worker node)
    watcher = Watcher(board, interval=1.0 if display else 5.0,
                      on_update=display.update if display else None)
    try:
        if display:
            display.start()
        watcher.start()
        try:
            with waiting(f"train {plan.run_name}: workers", stop=lambda: _stop_run(trainer)):
                result = _fit(trainer)
        except HybridRayError:
            raise
        except Exception as e:
            raise _explain(e, plan) from None
        finally:
            state = watcher.stop()
            if display:
                display.stop()
    finally:
        ray.kill(board)
        remove_placement_groups(trainer.controller)
    out = _result(config, plan, corpus, cluster, result, state, time.time() - started)
    _audit(cluster, out, plan)
    return out


def _stop_run(trainer: Any) -> None:
    """Stop a run whose workers waited past the deadline.

    Train's graceful abort (what Ctrl-C asks for) waits until the controller's loop is free,
    and the controller blocks in ``PlacementGroup.wait`` while its workers cannot be placed;
    so the controller actor is killed at once: ``fit()`` returns with the actor's death, and
    ``train`` then removes the pending group (``remove_placement_groups``)."""
    import ray

    if trainer.controller is None:
        raise TrainError("the run has no Ray Train controller yet")
    ray.kill(trainer.controller, no_restart=True)


def remove_placement_groups(controller: Any) -> None:
    """Remove every placement group the run's controller created that is still there (none
    after a run that ended well: Ray Train removed its own).

    Ray removes a group once both the job and the actor that created it are gone, so a
    controller that died (killed at a wait deadline, lost, aborted) while this driver lives
    on would leave its group reserving CPUs, or pending and taking them when they free up.
    Ray Train starts a detached ``PlacementGroupCleaner`` actor per run for this: a Python
    process of its own, started with the run, asking the state API every second whether
    the controller lives (0.015 of a core on the 2-core bench), registering a group only once
    its workers started, so a group still pending when the controller died stayed. The
    driver outlives the controller in every case but its own death, which ends the job and
    so frees the group; it looks once, when ``fit()`` has returned or raised, and removes
    by creator (the controller), pending groups included.
    """
    if controller is None:
        return
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        creator = controller._actor_id.binary()
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            group = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if group.creator_actor_id != creator or \
                    group.state == gcs_pb2.PlacementGroupTableData.REMOVED:
                continue
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(
                group.placement_group_id)))
    except Exception as e:      # never hide the run's own outcome behind its cleanup
        import logging

        logging.getLogger(__name__).warning(
            "could not remove the placement groups of the run's controller: %s; list them "
            "with `ray list placement-groups` and remove any left pending", e)


def _explain(error: Exception, plan: RunPlan) -> Exception:
    """A ``HybridRayError`` for a failed ``fit()``, naming the worker's own error."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "_base_exc", None) or getattr(failure, "cause", None) \
            or failure       # Ray Train wraps the worker's exception with its traceback
        if isinstance(cause, HybridRayError):
            return cause
        text = str(failure).strip().splitlines()
        for line in reversed(text):
            if "Error" in line or "Violation" in line:
                return TrainError(f"{plan.run_name}: worker rank {rank} failed: {line.strip()}")
    if isinstance(error, HybridRayError):
        return error
    lines = [x.strip() for x in str(error).strip().splitlines()
             if x.strip() and "errors.pydantic.dev" not in x]
    return TrainError(f"{plan.run_name}: training failed: "
                      f"{lines[-1] if lines else type(error).__name__}")


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
    attempts = _attempts(state["attempts"], m)
    redone = sum(max(0, prev["max_step"] - cur["start_step"])
                 for prev, cur in zip(attempts, attempts[1:], strict=False))
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
        progress_error=state.get("error"),
        end_to_end_tokens_per_s=(state.get("summary") or {}).get("end_to_end_tokens_per_s"),
        metrics=m, ray_result=result)


def _attempts(seen: list[dict[str, Any]], final: dict[str, Any]) -> list[dict[str, Any]]:
    """The attempts the progress record saw, completed from the final result: a run whose
    last attempt resumed from a checkpoint says so in its own metrics, so a restart is never
    lost even if the record missed it (its start and sites come from the checkpoint)."""
    resumed = final.get("resumed_from_step")
    if resumed is None or any(a["resumed"] and a["start_step"] == resumed for a in seen):
        return list(seen)
    return [*seen, {"start_step": resumed, "max_step": int(final.get("step", resumed)),
                    "resumed": True, "sites": final.get("worker_sites", []),
                    "started_at": None, "rebuilt_from": "checkpoint"}]


def _audit(cluster: Any, out: TrainResult, plan: RunPlan) -> None:
    """Record the run, and the bytes it sent between sites, in the cluster's audit log."""
    from hybridray.train.wan import cross_site_links, ring_edge_bytes

    topo = cluster.topology
    cluster.audit.record("train-end", cluster=cluster.name, run=out.name, steps=out.steps,
                         checkpoint=out.checkpoint, data_class=out.data_class,
                         worker_sites=out.worker_sites, restarts=out.restarts,
                         steps_redone=out.steps_redone, final_eval_loss=out.final_eval_loss)
    data_site = out.corpus.split(":", 1)[0]
    for site, nbytes in zip(out.worker_sites, out.metrics.get("bytes_read", []), strict=False):
        if site != data_site and nbytes:
            cluster.audit.transfer(data_site, site, nbytes, topo.egress_cost(
                data_site, site, nbytes), run=out.name, what="corpus shards")
    # Measured bytes of each log window, spread over the ring edges of that window's sites.
    per_link: Counter = Counter()
    for h in out.history:
        payload = (h.get("comm_bytes_per_step_all_ranks") or 0) * h.get("window_steps", 0)
        sites = h.get("worker_sites", [])
        for link, n in cross_site_links(sites).items():
            per_link[link] += ring_edge_bytes(payload, len(sites)) * n
    for (src, dst), nbytes in per_link.items():
        if int(nbytes):
            cluster.audit.transfer(src, dst, int(nbytes), topo.egress_cost(src, dst, int(nbytes)),
                                   run=out.name, what=f"gradients ({out.wan.get('wan_mode')}, "
                                                       "ring estimate)")
