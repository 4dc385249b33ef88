"""What a training run is, validated once at the edge: YAML and ``key=value`` in, a config out.

Train configs are loaded like cluster files: the same safe YAML reader (no duplicate keys,
alias bombs or multiple documents), ``key.sub=value`` overrides applied *before* validation,
and every problem reported at once as ``file: key.path: message``. The rest of the training
code sees only these frozen, checked models.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hybridray.configfile import read_config_text, safe_yaml, validate_config
from hybridray.placement.workload import Preference
from hybridray.topology.models import NAME_HELP, NAME_PATTERN, DataClass
from hybridray.train.kinds import FACTORY_HELP, FACTORY_PATTERN

# Sizes are repeated here (not imported from model.py) so loading a config never imports torch.
SIZES = ("tiny", "small", "medium", "gpt2-124m")
WAN_MODES = ("fp32", "bf16", "fp16", "powersgd", "localsgd", "diloco")
Precision = Literal["fp32", "bf16", "fp16"]
WanMode = Literal["fp32", "bf16", "fp16", "powersgd", "localsgd", "diloco"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    """Which model to train: the built-in GPT (a named size, optionally reshaped), your own
    (``factory``), and optionally a checkpoint to start from."""

    size: str = Field("tiny", description=f"One of {', '.join(SIZES)}.")
    n_layer: int | None = Field(None, ge=1, le=256, description="Override the size's layers.")
    n_head: int | None = Field(None, ge=1, le=256, description="Override the size's heads.")
    n_embd: int | None = Field(None, ge=8, le=65536, description="Override the size's width.")
    block_size: int | None = Field(None, ge=2, le=1 << 20, description="Override the context.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout while training.")
    bias: bool = Field(True, description="Biases in Linear and LayerNorm layers.")
    init_from: str | None = Field(
        None, description="A hybridray checkpoint to start from (fine-tuning): SITE:PATH in "
                          "site storage, a URI, or a local directory. Its shape wins.")
    factory: str | None = Field(
        None, description="Your own model instead of the GPT: MODULE:CALLABLE returning a "
                          "torch.nn.Module that maps byte ids (B, T) to logits (B, T, 256); "
                          "called with model.kwargs (see docs/training.md).")
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="Keyword arguments for model.factory.")

    @field_validator("size")
    @classmethod
    def _known_size(cls, value: str) -> str:
        if value not in SIZES:
            close = difflib.get_close_matches(value, SIZES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown model size {value!r}{hint} (valid: {', '.join(SIZES)})")
        return value

    @field_validator("factory")
    @classmethod
    def _factory_path(cls, value: str | None) -> str | None:
        if value is not None and not re.match(FACTORY_PATTERN, value):
            raise ValueError(f"{value!r} is not {FACTORY_HELP}")
        return value

    @model_validator(mode="after")
    def _gpt_fields_only_for_gpt(self) -> ModelSection:
        # by value, not by fields_set: workers re-validate the full dumped config
        gpt_only = [f for f in ("size", "n_layer", "n_head", "n_embd", "dropout", "bias")
                    if getattr(self, f) != type(self).model_fields[f].default]
        if self.factory and gpt_only:
            raise ValueError(f"@{gpt_only[0]}@ shapes the built-in GPT; with model.factory "
                             "pass your model's settings in model.kwargs (model.block_size "
                             "still sets the sequence length)")
        if self.kwargs and not self.factory:
            raise ValueError("@kwargs@ are for model.factory, which is not set")
        return self

    def overrides(self) -> dict[str, Any]:
        return {"n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd,
                "block_size": self.block_size, "dropout": self.dropout, "bias": self.bias}


class DataSection(_Strict):
    """The corpus: where its text comes from, its class, and where its token shards live."""

    source: str = Field(
        "stdlib", description="stdlib (the Python standard library's .py files), an absolute "
                              "directory on the data site's nodes, SITE:PATH of text files "
                              "in site storage, or dataset:SITE:PATH, the committed version "
                              "of a dataset written by hybridray sync (one document per row).")
    include: list[str] = Field(["*.py"], min_length=1,
                               description="Glob patterns of file names to take.")
    text_column: str = Field("text", min_length=1,
                             description="With dataset:SITE:PATH, the string column to train on.")
    data_class: DataClass | None = Field(
        None, description="Class of the corpus; checkpoints inherit it. Unset: the "
                          "cluster's default_data_class (restricted unless the topology "
                          "says otherwise), as for undeclared workloads and sync sources.")
    output: str = Field("onprem:datasets/stdlib-bytes",
                        description="SITE:PATH where token shards and manifest.json live.")
    val_fraction: float = Field(0.05, gt=0, lt=0.5,
                                description="Share of files held out for evaluation.")
    max_files: int | None = Field(None, ge=2, description="Take at most this many files.")
    shard_files: int = Field(64, ge=1, le=100_000, description="Source files per shard.")
    prepare: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: reuse shards whose manifest matches the source; always: "
                            "rebuild; never: fail unless prepared shards exist.")


class TrainSection(_Strict):
    """Workers, placement, optimisation, evaluation and checkpoint cadence."""

    workers: int | tuple[int, int] = Field(
        2, description="Number of Ray Train workers, or [min, max] for an elastic group.")
    cpus_per_worker: float = Field(1.0, gt=0, le=4096)
    gpus_per_worker: float = Field(0.0, ge=0, le=64)
    accelerator: str | None = Field(None, description="Only nodes with this accelerator.")
    preference: Preference = Field(Preference.cheapest, description="How sites are ordered.")
    site: str | None = Field(None, description="Prefer this site (burst elsewhere if full).")
    burst: bool = Field(True, description="Allow workers at other allowed sites when full.")
    spot_ok: bool = Field(True, description="Allow spot / preemptible pools.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    steps: int = Field(200, ge=1, le=10_000_000, description="Optimizer steps in all.")
    micro_batch: int = Field(8, ge=1, le=65536, description="Sequences per worker per micro-step.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-steps per optimizer step.")
    lr: float = Field(1e-3, gt=0, le=10)
    min_lr: float = Field(1e-4, ge=0, le=10, description="Floor of the cosine schedule.")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0, le=10)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm (0: off).")
    precision: Precision = Field("fp32", description="fp32, bf16 or fp16 (with GradScaler).")
    compile: bool = Field(False, description="torch.compile the model.")
    seed: int = Field(1337, ge=0)
    eval_interval: int = Field(50, ge=1, description="Evaluate every N steps (and at the end).")
    eval_batches: int = Field(4, ge=1, description="Micro-batches per worker per evaluation.")
    log_interval: int = Field(10, ge=1)
    checkpoint_interval: int = Field(100, ge=1, description="Checkpoint every N steps.")
    keep_checkpoints: int = Field(3, ge=1)
    max_failures: int = Field(2, ge=-1, description="Restarts from the latest checkpoint.")
    replace_on_restart: bool = Field(
        True, description="After a failure, start workers at any site the placement allowed "
                          "(not only where they first ran), so a lost site does not stall "
                          "the run.")
    resume: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: continue this run's latest checkpoint if there is one and "
                            "it was trained as this config asks (same WAN mode, precision and "
                            "model, below train.steps), else refuse, naming the choices; "
                            "always (--resume): continue it even with another WAN mode or "
                            "precision; never (--new-run): start a new run (the name gets a "
                            "time suffix).")
    queue: bool = Field(
        False, description="Wait for CPUs that Serve replicas or other runs hold now instead "
                           "of being refused (--queue); the wait is reported and gives up "
                           "after $HYBRIDRAY_WAIT_TIMEOUT_S seconds.")
    elastic_resize_interval_s: float = Field(60.0, ge=0)
    worker_niceness: int = Field(
        0, ge=0, le=19,
        description="Niceness of the training workers. Ray starts every worker at 15 so its "
                    "daemons come first; a rank descheduled behind one stalls every rank at "
                    "the next all-reduce, so workers run at the raylet's own priority (0). "
                    "Raise it to let other work on the node go first.")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_list(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _consistent(self) -> TrainSection:
        if isinstance(self.workers, tuple):
            lo, hi = self.workers
            if not 1 <= lo <= hi:
                raise ValueError(f"@workers@ needs 1 <= min <= max (got [{lo}, {hi}])")
        elif self.workers < 1:
            raise ValueError(f"@workers@ must be >= 1 (got {self.workers})")
        if self.min_lr > self.lr:
            raise ValueError(f"@min_lr@ must be <= lr ({self.min_lr} > {self.lr})")
        return self

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers


class WanSection(_Strict):
    """How gradients cross slow links between sites (see docs/training.md)."""

    mode: WanMode = Field(
        "fp32", description="fp32: plain DDP all-reduce; bf16/fp16: compressed all-reduce "
                            "hook; powersgd: low-rank hook; localsgd: average weights every "
                            "sync_every steps; diloco: outer Nesterov step every sync_every.")
    powersgd_rank: int = Field(2, ge=1, le=1024)
    powersgd_start: int = Field(10, ge=2, description="Plain all-reduce before this step.")
    sync_every: int = Field(8, ge=1, le=100_000,
                            description="Local steps between averaging rounds (localsgd, diloco).")
    outer_lr: float = Field(0.7, gt=0, le=10, description="DiLoCo outer learning rate.")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="DiLoCo Nesterov momentum.")
    outer_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype of weights/deltas sent in averaging rounds.")
    site_ddp: bool = Field(True, description="localsgd/diloco: all-reduce gradients every step "
                                             "among workers of the same site.")


class CheckpointSection(_Strict):
    """Where checkpoints go: a site's storage (it must be allowed to hold the data class)."""

    site: str | None = Field(None, description="Site whose storage holds checkpoints "
                                               "(default: the data's site).")
    path: str = Field("checkpoints", min_length=1,
                      description="Path under the site's storage root; runs go in PATH/NAME.")


class MetricsSection(_Strict):
    """Logging: the console display and the peak used for model-FLOPs utilisation."""

    peak_flops: float | None = Field(
        None, gt=0, description="Peak FLOP/s of ONE worker for MFU; default: by device and "
                                "precision (CPU: 1e11 per CPU, see docs/training.md).")
    progress: bool = Field(True, description="Show a live progress display on the console.")


class TrainConfig(_Strict):
    """A training run: model, data, workers, WAN strategy, checkpoints, metrics."""

    name: str = Field("gpt-bytes", pattern=NAME_PATTERN, description=NAME_HELP)
    cluster: str | None = Field(None, description="Cluster started by hybridray up (default: "
                                                  "$HYBRIDRAY_CLUSTER or the only one).")
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    wan: WanSection = WanSection()
    checkpoint: CheckpointSection = CheckpointSection()
    metrics: MetricsSection = MetricsSection()

    @model_validator(mode="after")
    def _cross(self) -> TrainConfig:
        t, w = self.train, self.wan
        if w.mode in ("localsgd", "diloco") and t.checkpoint_interval % w.sync_every:
            raise ValueError(
                f"@train.checkpoint_interval@ must be a multiple of wan.sync_every "
                f"({w.sync_every}) with wan.mode={w.mode}, so checkpoints hold averaged "
                f"weights (got {t.checkpoint_interval})")
        return self


def load_train_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
                      ) -> TrainConfig:
    """Read a train YAML, apply ``key.sub=value`` overrides, validate.

    Raises:
        ConfigError: every problem, as ``file: key.path: message``.
    """
    text = read_config_text(path, kind="train config", example="configs/train/tiny.yaml")
    return parse_train_config(text, label=str(path), overrides=overrides)


def parse_train_config(text: str, *, label: str = "<string>",
                       overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Like ``load_train_config`` but from YAML text (``label`` names it in errors)."""
    data = safe_yaml(text, label, kind="train config", needs="name", allow_empty=True)
    return config_from_dict(data, label=label, overrides=overrides)


def config_from_dict(data: dict[str, Any], *, label: str = "<config>",
                     overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Validate a plain dict (after applying overrides) into a ``TrainConfig``."""
    return validate_config(TrainConfig, data, label=label, overrides=overrides,
                           name_pattern=NAME_PATTERN, name_help=NAME_HELP)


