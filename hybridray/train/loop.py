"""What every Ray Train worker runs: residency check, data, DDP, AMP, checkpoints, metrics.

The loop is one function (``train_loop_per_worker``) so it runs unchanged under Ray Train and,
for the benchmark's plain-PyTorch baseline, under ``torch.multiprocessing`` (``Session``
abstracts the few calls that differ). Data order is a pure function of ``(seed, cursor)``:
the cursor counts sequences consumed by all workers together, so a restart (or an elastic
resize to another worker count) continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import base64
import contextlib
import math
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hybridray.exceptions import TrainError
from hybridray.train import checkpoint as ckpt
from hybridray.train.config import TrainConfig
from hybridray.train.kinds import ModelKind, kind_of
from hybridray.train.model import TOKENIZER
from hybridray.train.wan import make_strategy

EOT = 256   # the corpus's end-of-document token; byte models (ids 0..255) see byte 0 there
CPU_PEAK_FLOPS_PER_CPU = 1e11      # MFU default on CPU: 100 GFLOP/s per logical CPU
# Dense peak per GPU: (bf16/fp16 tensor cores, TF32 tensor cores). An fp32 run's matmuls run
# on TF32 (the loop allows it on CUDA), so its MFU is against the TF32 peak, not plain fp32's
# (67 TFLOP/s on an H100, against which an fp32 run read 198% "MFU").
GPU_PEAK_FLOPS = {
    "H100": (989e12, 494.7e12), "H200": (989e12, 494.7e12), "A100": (312e12, 156e12),
    "L4": (121e12, 60.5e12), "A10G": (125e12, 62.5e12), "L40S": (362e12, 183e12),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STEP_REPORT_S = 0.5                # at most this often rank 0 sends its step to the board


# ---- where the loop runs ------------------------------------------------------------------

class Session:
    """The calls that differ between Ray Train and a plain ``torch.distributed`` run."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device,
                 site: str = "local"):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self._site = site

    def site(self, data_class: str) -> str:
        return self._site

    def latest_checkpoint(self) -> Any:
        return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        pass

    def finished(self, model: Any) -> None:
        """Called with the trained model (unwrapped) when the loop ends."""


class RaySession(Session):
    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        super().__init__(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(),
                         ray.train.torch.get_device())

    def site(self, data_class: str) -> str:
        from hybridray.placement.guard import check_residency

        return check_residency(data_class)

    def latest_checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int) -> None:
        import ray.train

        saving = metrics.get("checkpoint", False)
        if metrics.get("checkpoint") is False:
            # A log window without a checkpoint: its metrics already went to the board actor
            # (rank 0); ray.train.report is a barrier of all ranks through an actor, measured
            # at about a second per call on this 2-core machine, so it is kept for checkpoints
            # (every rank takes the same branch: ``checkpoint`` is the same on all of them).
            return
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir \
            else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint-{step:08d}" if checkpoint else None)
        if saving:
            # Ray Train registers a reported checkpoint asynchronously; wait until it is
            # committed, so a failure from here on resumes from it (at most one checkpoint
            # interval of steps is ever redone).
            # hybridray's controller polls at once when a worker waits (train/controller.py).
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def finished(self, model: Any) -> None:
        from hybridray.train.controller import expedite_controller

        expedite_controller()     # fit() returns at the controller's next poll: make it soon


def train_loop_per_worker(spec: dict[str, Any]) -> None:
    """Ray Train entry point; ``spec`` is built by ``hybridray.train.trainer``."""
    run_loop(spec, RaySession())


# ---- data ---------------------------------------------------------------------------------

class Sampler:
    """Sequences of ``block + 1`` tokens in a per-epoch random order fixed by the seed."""

    def __init__(self, tokens: np.ndarray, block: int, seed: int, split: str):
        self.tokens, self.block, self.seed = tokens, block, seed
        self.count = (len(tokens) - 1) // block
        if self.count < 1:
            raise TrainError(f"the {split} split has {len(tokens)} tokens, fewer than one "
                             f"sequence of {block + 1}; use more files (data.max_files) or a "
                             f"smaller model.block_size")
        self._perm: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(
                self.count)}
        return self._perm[epoch]

    def starts(self, first: int, n: int) -> np.ndarray:
        idx = np.arange(first, first + n)
        out = np.empty(n, dtype=np.int64)
        for epoch in np.unique(idx // self.count):
            sel = idx // self.count == epoch
            out[sel] = self._order(int(epoch))[idx[sel] % self.count] * self.block
        return out

    def batch(self, starts: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.block + 1)]
                                .astype(np.int64))
        if device.type == "cuda":
            rows = rows.pin_memory().to(device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]


def lr_at(step: int, t: Any) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at the last step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (t.lr - t.min_lr)


def peak_flops(config: TrainConfig, device: torch.device) -> float:
    """Peak FLOP/s of one worker, for MFU (``metrics.peak_flops`` wins)."""
    if config.metrics.peak_flops:
        return config.metrics.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAK_FLOPS.items():
            if key in name:
                return tf32 if config.train.precision == "fp32" else half
        return 100e12
    return CPU_PEAK_FLOPS_PER_CPU * config.train.cpus_per_worker


# ---- the loop -----------------------------------------------------------------------------

def _gather(obj: Any, world: int) -> list[Any]:
    if world < 2:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _mean(value: float, world: int, device: torch.device) -> float:
    if world < 2:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world


def _check_precision(precision: str, device: torch.device) -> None:
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no "
                         "bfloat16 support; use fp16 or fp32")


def run_loop(spec: dict[str, Any], session: Session) -> dict[str, Any]:
    """Train per ``spec`` in this process (one rank); returns rank 0's last metrics."""
    from hybridray.topology.models import Topology
    from hybridray.train.corpus import load_tokens

    config = TrainConfig.model_validate(spec["config"])
    t = config.train
    rank, world, device = session.rank, session.world, session.device
    # Residency first: nothing below may touch data on a node that may not hold it.
    site = session.site(spec["data_class"])
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    else:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    _check_precision(t.precision, device)
    sites = _gather(site, world)

    topology = Topology.model_validate(spec["topology"]) if spec.get("topology") else None
    tokens, bytes_read = (spec["tokens"], 0) if "tokens" in spec else load_tokens(
        spec["corpus"], spec["corpus_address"], topology)
    kind = kind_of(spec["model_config"], spec.get("model_fn"))
    block = kind.block_size
    if kind.config.vocab_size <= EOT:   # a byte model has no id for "end of document":
        tokens = {k: np.where(v == EOT, 0, v).astype(v.dtype) for k, v in tokens.items()}
    train_data = Sampler(tokens["train"], block, t.seed, "train")
    val_data = Sampler(tokens["val"], block, t.seed, "val")

    torch.manual_seed(t.seed)                # the same initial weights on every rank
    raw = kind.build().to(device)
    torch.manual_seed(t.seed + rank)         # then each rank its own dropout stream
    optimizer = kind.optimizer(raw, t.lr, t.weight_decay, tuple(t.betas))
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    start_step, cursor, history, tokens_seen, wan_state, resumed_from = 0, 0, [], 0, None, None

    latest = session.latest_checkpoint()
    if latest is not None:
        reader = ckpt.CheckpointReader(latest)
        state = _restore(reader, raw, optimizer, scaler, kind)
        start_step, cursor = state["step"], state["data"]["cursor"]
        history, tokens_seen = state.get("eval_history", []), state.get("tokens_seen", 0)
        wan_state, resumed_from = state.get("wan"), reader.label
        same_world = state.get("world_size") == world
        _set_rng(state.get("rng") if same_world else None, rank, device)
    elif spec.get("init_from"):
        reader = ckpt.CheckpointReader(spec["init_from"]["uri"])
        ckpt.check_fits(reader, ckpt.read_config(reader), kind)
        raw.load_state_dict(ckpt.read_weights(reader, kind.config), strict=False)

    model = torch.compile(raw) if t.compile else raw
    wan = make_strategy(config.wan, sites, rank, device)
    model = wan.wrap(model, raw)
    wan.load_state_dict(wan_state)

    autocast = (torch.autocast(device.type, dtype=DTYPES[t.precision])
                if t.precision != "fp32" else contextlib.nullcontext())
    per_step = t.micro_batch * t.grad_accum * world
    tokens_per_step = per_step * block
    flops_per_token = kind.flops_per_token(raw, block)
    peak = peak_flops(config, device) * world
    board = spec.get("board")

    # A fixed evaluation set, spread evenly over the held-out files, split among the ranks.
    total = min(val_data.count, t.eval_batches * t.micro_batch * world)
    mine = (np.linspace(0, val_data.count - 1, total).astype(np.int64) * block)[rank::world]

    def evaluate() -> float:
        raw.eval()
        loss, count = torch.zeros((), device=device), 0
        with torch.no_grad(), autocast:
            for i in range(0, len(mine), t.micro_batch):
                x, y = val_data.batch(mine[i:i + t.micro_batch], device)
                loss += kind.loss(raw, x, y).float() * len(x)
                count += len(x)
        raw.train()
        return _mean((loss / max(count, 1)).item(), world, device)

    common = {"site": site, "worker_sites": sites, "workers_per_site": dict(Counter(sites)),
              "world_size": world, "data_class": spec["data_class"],
              "resumed_from_step": start_step if resumed_from else None,
              "params": kind.num_params(raw), "bytes_read": _gather(bytes_read, world)}
    if rank == 0 and board is not None:
        board.start.remote(start_step, bool(resumed_from), sites)
    if not history or history[-1][0] != start_step:
        history.append([start_step, evaluate()])

    metrics: dict[str, Any] = {}
    loop_start = window_start = time.perf_counter()
    cpu_start = time.process_time()    # CPU time of this process (all its threads)
    window_steps, paused, paused_cpu = 0, 0.0, 0.0   # paused: evaluation inside the window
    loss_sum, loss_count = torch.zeros((), device=device), 0
    comm_mark = wan.meter.snapshot()
    next_tick = 0.0                    # when rank 0 next tells the board its step
    for step in range(start_step, t.steps):
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(t.grad_accum):
            first = cursor + (micro * world + rank) * t.micro_batch
            x, y = train_data.batch(train_data.starts(first, t.micro_batch), device)
            sync = micro == t.grad_accum - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                loss = kind.loss(model, x, y) / t.grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
            loss_count += 1
        if t.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        wan.after_step(done, t.steps)
        cursor += per_step
        tokens_seen += tokens_per_step
        window_steps += 1

        log = done % t.log_interval == 0 or done == t.steps
        save = done % t.checkpoint_interval == 0 or done == t.steps
        if rank == 0 and board is not None and (log or save or time.monotonic() >= next_tick):
            # An actor call per step cost rank 0 (and so both ranks, which wait for it at the
            # next all-reduce) an RPC per step; twice a second is enough for the progress bar
            # and for counting redone steps (a restart loses at most half a second of them).
            board.step_done.remote(done)
            next_tick = time.monotonic() + STEP_REPORT_S
        if done % t.eval_interval == 0 or done == t.steps:
            began, began_cpu = time.perf_counter(), time.process_time()
            history.append([done, evaluate()])
            paused += time.perf_counter() - began
            paused_cpu += time.process_time() - began_cpu
        if not (log or save):
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - window_start - paused
        cpu_s = _mean(time.process_time() - cpu_start - paused_cpu, world, device) * world
        comm_now = wan.meter.snapshot()
        tps = window_steps * tokens_per_step / elapsed if elapsed > 0 else 0.0
        metrics = {
            **common, "step": done, "steps": t.steps, "lr": lr,
            "loss": _mean(loss_sum.item() * t.grad_accum / loss_count, world, device),
            "eval_loss": history[-1][1], "eval_step": history[-1][0], "eval_history": history,
            "tokens_per_s": tps, "tokens_seen": tokens_seen,
            "mfu": flops_per_token * tps / peak, "precision": t.precision,
            # robust to other load on the machine: tokens per CPU-second of the workers
            "tokens_per_cpu_s": window_steps * tokens_per_step / cpu_s if cpu_s > 0 else 0.0,
            # end to end since this attempt's first step: logging, evals, checkpoints included
            "loop_tokens_per_s": (done - start_step) * tokens_per_step
            / (time.perf_counter() - loop_start),
            **wan.report(comm_now[0] - comm_mark[0], comm_now[1] - comm_mark[1], window_steps),
            "checkpoint": save, "window_steps": window_steps,
        }
        window_steps, paused, paused_cpu, comm_mark = 0, 0.0, 0.0, comm_now
        loss_sum, loss_count = torch.zeros((), device=device), 0
        if rank == 0 and board is not None:
            board.log.remote({k: v for k, v in metrics.items() if k != "eval_history"})
        with tempfile.TemporaryDirectory(prefix="hybridray-ckpt-") as tmp:
            directory = None
            rngs = _gather(_rng_state(device), world) if save else None
            if save and rank == 0:
                directory = _save(tmp, raw, optimizer, scaler, wan, spec, config, {
                    "step": done, "cursor": cursor, "eval_history": history,
                    "tokens_seen": tokens_seen, "site": site, "rng": rngs})
            session.report(metrics, directory, done)
        window_start = time.perf_counter()   # checkpoint time is not training throughput
        cpu_start = time.process_time()
    if not metrics:  # resumed at the last step: report once so the run has a result
        metrics = {**common, "step": start_step, "steps": t.steps, "eval_loss": history[-1][1],
                   "eval_history": history, "tokens_seen": tokens_seen}
        session.report(metrics, None, start_step)
    # End to end: from this attempt's first step until its last checkpoint is saved and, under
    # Ray Train, committed (report() waits for that), every log, eval and checkpoint included.
    seconds = time.perf_counter() - loop_start
    summary = {"attempt_steps": t.steps - start_step, "attempt_seconds": seconds,
               "end_to_end_tokens_per_s": (t.steps - start_step) * tokens_per_step / seconds
               if seconds > 0 else None}
    if rank == 0 and board is not None:
        import ray

        with contextlib.suppress(Exception):   # the record is the driver's; never fail on it
            ray.get(board.finish.remote(summary), timeout=30)
    session.finished(raw)
    return {**metrics, **summary}


def _save(tmp: str, raw: torch.nn.Module, optimizer: Any, scaler: Any, wan: Any,
          spec: dict[str, Any], config: TrainConfig, s: dict[str, Any]) -> str:
    ckpt.save_checkpoint(
        tmp, raw, model_config=spec["model_config"],
        optimizer={"optimizer": optimizer.state_dict(),
                   "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                   "wan": wan.state_dict()},
        state={"step": s["step"], "data": {"cursor": s["cursor"], "seed": config.train.seed,
                                           "corpus": spec.get("corpus_address"),
                                           "fingerprint": spec.get("corpus", {}).get(
                                               "fingerprint")},
               "rng": {"seed": config.train.seed, "by_rank": s["rng"]},
               "precision": config.train.precision, "tokens_seen": s["tokens_seen"],
               "eval_history": s["eval_history"], "wan_mode": config.wan.mode,
               "world_size": len(wan.sites)},
        meta={"data_class": spec["data_class"], "site": s["site"], "tokenizer": TOKENIZER,
              "run": spec.get("run_name"), "cluster": spec.get("cluster"),
              "dataset": spec.get("corpus_address"), "step": s["step"],
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        signing_key=bytes.fromhex(spec["meta_key"]) if spec.get("meta_key") else None)
    return tmp


def _restore(reader: ckpt.CheckpointReader, raw: torch.nn.Module, optimizer: Any, scaler: Any,
             kind: ModelKind) -> dict[str, Any]:
    """Load model, optimizer and scaler from ``reader``; returns state.json."""
    have = ckpt.read_config(reader)
    ckpt.check_fits(reader, have, kind)
    raw.load_state_dict(ckpt.read_weights(reader, have), strict=False)
    opt = ckpt.read_optimizer(reader)
    try:
        optimizer.load_state_dict(opt["optimizer"])
    except (ValueError, KeyError) as e:
        raise TrainError(f"{reader.where(ckpt.OPTIMIZER_FILE)}: does not fit this model's "
                         f"optimizer ({e})") from None
    if opt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(opt["scaler"])
    state = ckpt.read_state(reader)
    if "cursor" not in state.get("data", {}):
        raise TrainError(f"{reader.where(ckpt.STATE_FILE)}: missing data.cursor")
    state["wan"] = opt.get("wan")
    return state


def _rng_state(device: torch.device) -> dict[str, str | None]:
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode()

    return {"cpu": b64(torch.get_rng_state()),
            "cuda": b64(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None}


def _set_rng(rng: dict[str, Any] | None, rank: int, device: torch.device) -> None:
    """Each rank continues its own random stream (dropout) when the world size is unchanged;
    after an elastic resize, streams are re-seeded from (seed, rank) instead."""
    states = (rng or {}).get("by_rank") or []
    if rank >= len(states) or not states[rank]:
        return

    def tensor(text: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())

    torch.set_rng_state(tensor(states[rank]["cpu"]))
    if device.type == "cuda" and states[rank].get("cuda"):
        torch.cuda.set_rng_state(tensor(states[rank]["cuda"]), device)


