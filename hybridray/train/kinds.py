"""The built-in GPT or your own model: what the training loop and checkpoints need of a model.

A run trains either hybridray's GPT (``model.size`` and friends) or a model you bring, given
as a *factory*: ``model.factory: "package.module:function"`` in a train config (imported on
the driver and on every worker, called as ``function(**model.kwargs)``), or
``hybridray.train(config, model=function)`` from Python (the callable is shipped to the
workers, closures included). The factory returns a ``torch.nn.Module`` that maps byte token
ids ``(batch, T)`` (int64, 0..255) to logits ``(batch, T, 256)``, or to a tuple whose first
item, or an object whose ``.logits``, is that tensor. The corpus ends each document with an
end-of-document token (256) that the GPT's vocabulary has; your model sees byte 0 there.
hybridray adds the next-byte cross-entropy, DDP and the WAN strategies, AMP, the schedule,
checkpoints and resume.

Optional methods the loop uses when the module has them: ``optimizer(lr, weight_decay,
betas)`` (else AdamW with decay on matrices only) and ``flops_per_token(seq_len)`` for MFU
(else ``6 × parameters``, which leaves out attention's share).

Checkpoints of your model hold its ``state_dict`` as-is (shared tensors once), so the weights
load back into the same module with ``safetensors.torch.load_file`` or through
``hybridray.train.load_model`` (which imports the factory again). Serving's completion
route runs hybridray GPT checkpoints only.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hybridray.exceptions import TrainError

VOCAB = 256                     # byte-level: one token per byte
FACTORY_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
FACTORY_HELP = "an import path MODULE:CALLABLE, e.g. mypkg.models:build"
_IMPORT_FIX = ("make it importable on the driver and on every worker node: install the "
               "package there, put its directory on PYTHONPATH, or submit the job with "
               "--working-dir holding it")


class CustomModelConfig(BaseModel):
    """``model_config.json`` of a run that trains your own model (``kind: custom``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["custom"] = "custom"
    factory: str = Field(description=FACTORY_HELP)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    block_size: int = Field(ge=2, le=1 << 20, description="Tokens per training sequence.")
    vocab_size: Literal[256] = VOCAB


# ---- the factory --------------------------------------------------------------------------

def factory_name(fn: Callable) -> str:
    """``module:qualname`` of a callable (what checkpoints record about it)."""
    module = getattr(fn, "__module__", None) or "unknown"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{name}"


def import_factory(name: str) -> Callable:
    """The callable named by ``MODULE:CALLABLE``; a ``TrainError`` that says how to fix it."""
    if not re.match(FACTORY_PATTERN, name):
        raise TrainError(f"model.factory {name!r}: not {FACTORY_HELP}")
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise TrainError(f"model.factory {name!r}: cannot import module {module_name!r} "
                         f"({e}); {_IMPORT_FIX}") from None
    except Exception as e:  # the user's module failed while importing
        raise TrainError(f"model.factory {name!r}: importing {module_name!r} raised "
                         f"{type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TrainError(f"model.factory {name!r}: module {module_name!r} has no "
                             f"{attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TrainError(f"model.factory {name!r}: {attr!r} is a {type(obj).__name__}, not "
                         "a callable that returns a torch.nn.Module")
    return obj


def resolve_factory(name: str) -> Callable:
    """The factory a train config names, imported on the driver (the current directory is
    searched too, as ``python -m`` does) and shipped to the workers by value unless it is an
    installed package, so a model file next to the config needs no install on any node."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    fn = import_factory(name)
    ship_by_value(fn)
    return fn


def ship_by_value(fn: Callable) -> None:
    """Have Ray pickle ``fn``'s top-level package by value (code, not an import path) when
    workers may not be able to import it: it is not installed in site-packages."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    if module is None or module.__name__ == "__main__":
        return                                 # __main__ is pickled by value already
    top = sys.modules.get(module.__name__.split(".")[0])
    where = getattr(top, "__file__", None) or ""
    if top is None or not where or top.__name__ == "hybridray" or \
            {"site-packages", "dist-packages"} & set(Path(where).parts):
        return
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(top)


# ---- the two kinds ------------------------------------------------------------------------

class ModelKind:
    """What the loop asks of a model; ``GPTKind`` and ``CustomKind`` answer it."""

    config: Any
    label: str

    def build(self) -> Any:
        raise NotImplementedError

    def loss(self, model: Any, x: Any, y: Any) -> Any:
        raise NotImplementedError

    def num_params(self, raw: Any) -> int:
        return sum(p.numel() for p in raw.parameters())     # shared parameters once

    def flops_per_token(self, raw: Any, seq_len: int) -> float:
        own = getattr(raw, "flops_per_token", None)
        return float(own(seq_len)) if callable(own) else 6.0 * self.num_params(raw)

    def optimizer(self, raw: Any, lr: float, weight_decay: float,
                  betas: tuple[float, float]) -> Any:
        own = getattr(raw, "optimizer", None)
        if callable(own):
            return own(lr, weight_decay, betas)
        import torch

        params = [p for p in raw.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas,
                                 fused=bool(params) and all(p.is_cuda for p in params))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors a checkpoint of this model holds (built on the meta device)."""
        import torch

        with torch.device("meta"):
            model = self.build()
        return {k: tuple(v.shape) for k, v in unique_state(model).items()}

    @property
    def block_size(self) -> int:
        return int(self.config.block_size)


class GPTKind(ModelKind):
    def __init__(self, config: Any):
        self.config = config
        self.label = f"GPT ({config.n_layer} layers × {config.n_embd})"

    def build(self) -> Any:
        from hybridray.train.model import GPT

        return GPT(self.config)

    def loss(self, model: Any, x: Any, y: Any) -> Any:
        return model(x, y)[1]

    def num_params(self, raw: Any) -> int:
        return raw.num_params()


class CustomKind(ModelKind):
    def __init__(self, config: CustomModelConfig, fn: Callable | None = None):
        self.config, self._fn = config, fn
        self.label = f"model {config.factory}"
        self._checked = False

    @property
    def fn(self) -> Callable:
        if self._fn is None:
            self._fn = import_factory(self.config.factory)
        return self._fn

    def build(self) -> Any:
        import torch

        try:
            model = self.fn(**self.config.kwargs)
        except TrainError:
            raise
        except Exception as e:
            raise TrainError(f"model.factory {self.config.factory}: raised "
                             f"{type(e).__name__}: {e} (called with model.kwargs "
                             f"{self.config.kwargs})") from None
        if not isinstance(model, torch.nn.Module):
            raise TrainError(f"model.factory {self.config.factory}: returned a "
                             f"{type(model).__name__}, not a torch.nn.Module")
        if not any(True for _ in model.parameters()):
            raise TrainError(f"model.factory {self.config.factory}: the module has no "
                             "parameters to train")
        return model

    def loss(self, model: Any, x: Any, y: Any) -> Any:
        import torch
        import torch.nn.functional as F

        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else \
            out[0] if isinstance(out, (tuple, list)) and out else getattr(out, "logits", None)
        if not self._checked:
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (*x.shape, VOCAB):
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else \
                    type(out).__name__
                raise TrainError(
                    f"model.factory {self.config.factory}: for token ids of shape "
                    f"{tuple(x.shape)} the model returned {got}; hybridray trains byte-level "
                    f"language models, so forward(ids) must return logits of shape "
                    f"(batch, T, {VOCAB}) (or a tuple / an object with .logits holding them)")
            self._checked = True
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1),
                               ignore_index=-1)


def kind_of(model_config: Any, fn: Callable | None = None) -> ModelKind:
    """The kind for a ``GPTConfig``, a ``CustomModelConfig`` or their JSON form."""
    from hybridray.train.model import GPTConfig

    if isinstance(model_config, dict):
        model_config = CustomModelConfig.model_validate(model_config) \
            if model_config.get("kind") == "custom" else GPTConfig.model_validate(model_config)
    if isinstance(model_config, CustomModelConfig):
        return CustomKind(model_config, fn)
    return GPTKind(model_config)


def unique_state(model: Any) -> dict[str, Any]:
    """``state_dict`` with each shared tensor once, under its first name (GPT's tied output
    layer is stored as ``transformer.wte.weight``); safetensors refuses shared tensors."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor
    return out
