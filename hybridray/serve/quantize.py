"""Quantize a model and prove it still agrees with its fp32 original, every time it is built.

``int8`` is PyTorch's dynamic quantization of ``nn.Linear`` layers: int8 weights with
per-channel scales, activations quantized on the fly. On a CPU without VNNI, fbgemm
quantizes activations to 7 bits with one scale per tensor, and a few input channels of a
small transformer carry outliers, so plain dynamic quantization of all-MiniLM-L6-v2 drops
to a cosine similarity of 0.95 against fp32. Two measures bring it back:

1. **Smoothing** (SmoothQuant, Xiao et al. 2023): each layer's input is divided per channel
   by ``s = max|x|^a / max|w|^(1-a)`` (measured on the calibration texts) and the weight
   columns are multiplied by ``s``, an exact identity in fp32 that moves the outliers from
   the activations into the per-channel weight scales, where int8 handles them.
2. **Checked mixed precision**: if the model still misses its bound, layers are ranked by
   their own output error and the fewest worst ones are kept in fp32 (bisection).

If nothing meets the bound the replica refuses to start: it never serves a model outside it.
The measured figure, the bound and the layers kept in fp32 form a ``QualityReport`` that the
replica exposes (``/v1/models``). The result is cached on disk by model, bound and engine, so
replicas after the first pay for one verifying measurement.

``bf16`` casts the weights to bfloat16 (GPU replicas), checked the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hybridray.exceptions import HybridRayError

Measure = Callable[[Any], tuple[float, dict[str, float]]]


class QualityError(HybridRayError):
    """A quantized model misses its accuracy bound against fp32, even with layers kept fp32."""


@dataclasses.dataclass
class QualityReport:
    """How a served model compares with its fp32 original, measured when it was built."""

    method: str                      # none | int8 | bf16
    metric: str                      # min_cosine | perplexity_ratio
    bound: float
    value: float                     # the measured figure the bound applies to
    details: dict[str, float]
    layers_quantized: int = 0
    layers_total: int = 0
    kept_fp32: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False

    @property
    def passed(self) -> bool:
        return _meets(self.metric, self.value, self.bound)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["passed"] = self.passed
        out["value"] = round(self.value, 6)
        out["details"] = {k: round(v, 6) for k, v in self.details.items()}
        return out


HIGHER_IS_BETTER = {"min_cosine": True, "perplexity_ratio": False}


def _meets(metric: str, value: float, bound: float) -> bool:
    return value >= bound if HIGHER_IS_BETTER[metric] else value <= bound


def linear_layers(model) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


def _set_module(model, name: str, module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


SMOOTHING_ALPHA = 0.8      # SmoothQuant migration strength; 0.5-0.85 suits small BERTs/GPTs
_SAMPLE_ROWS = 256         # calibration rows kept per layer to rank layers by output error


def _int8_twin(linear, scale=None):
    """The int8 twin of one Linear: ``x -> Q(W * s)(x / s)``, per-channel weight scales."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    src = linear
    if scale is not None:
        src = torch.nn.Linear(linear.in_features, linear.out_features,
                              bias=linear.bias is not None)
        with torch.no_grad():
            src.weight.copy_(linear.weight.detach().float() * scale)
            if linear.bias is not None:
                src.bias.copy_(linear.bias.detach().float())
    with warnings.catch_warnings():  # torch.ao's own deprecation notices, once per layer
        warnings.simplefilter("ignore")
        src.qconfig = per_channel_dynamic_qconfig
        twin = DynamicLinear.from_float(src)
        del src.qconfig
    return twin if scale is None else SmoothedInt8Linear(twin, 1.0 / scale)


class SmoothedInt8Linear(torch.nn.Module):
    """A dynamically quantized Linear whose input is first divided per channel."""

    def __init__(self, linear, inv_scale):
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", inv_scale.detach().float().contiguous())

    def forward(self, x):
        return self.linear(x * self.inv_scale.to(x.dtype))


class _Calibration:
    """Per-layer input statistics from one fp32 pass over the calibration inputs."""

    def __init__(self, model, names: list[str], run: Callable[[], None]):
        self.amax: dict[str, Any] = {}
        self.rows: dict[str, Any] = {}
        hooks = []

        def hook(name):
            def fn(_mod, inputs, _out):
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
                m = x.abs().amax(0)
                self.amax[name] = m if name not in self.amax else torch.maximum(
                    self.amax[name], m)
                have = self.rows.get(name)
                take = x[: _SAMPLE_ROWS - (0 if have is None else len(have))]
                self.rows[name] = take.clone() if have is None else torch.cat([have, take])
            return fn

        for name in names:
            hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
        try:
            with torch.inference_mode():
                run()
        finally:
            for h in hooks:
                h.remove()

    def scale(self, name: str, linear, alpha: float):
        wmax = linear.weight.detach().float().abs().amax(0).clamp(min=1e-5)
        amax = self.amax[name].clamp(min=1e-5)
        return (amax.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5, max=1e5).to(
            torch.float32)

    def error(self, name: str, fp32, int8) -> float:
        """Relative output error of one layer's int8 twin on its calibration inputs."""
        x = self.rows[name]
        with torch.inference_mode():
            want = fp32(x.to(fp32.weight.dtype)).float()
            got = int8(x).float()
        return float((got - want).norm() / want.norm().clamp(min=1e-12))


class _Swapper:
    """Swap Linear layers between fp32 and their int8 twins in place, without copies."""

    def __init__(self, model, names: list[str], calib: _Calibration | None, alpha: float):
        self.model = model
        self.fp32 = {n: model.get_submodule(n) for n in names}
        self.int8 = {}
        for n, lin in self.fp32.items():
            scale = calib.scale(n, lin, alpha) if calib is not None and n in calib.amax \
                else None
            self.int8[n] = _int8_twin(lin, scale)

    def use(self, quantized: set[str]) -> None:
        for name in self.fp32:
            _set_module(self.model, name, self.int8[name] if name in quantized else
                        self.fp32[name])


def fingerprint(model) -> str:
    """A short hash of a model's parameters (names, shapes and values)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            if isinstance(tensor, torch.Tensor):
                h.update(str(tuple(tensor.shape)).encode())
                h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_dir() -> Path:
    root = os.environ.get("HYBRIDRAY_CACHE") or Path.home() / ".cache" / "hybridray"
    return Path(root) / "quant"


def _cache_key(model_id: str, metric: str, bound: float) -> str:
    raw = json.dumps([model_id, metric, bound, SMOOTHING_ALPHA, torch.__version__,
                      torch.backends.quantized.engine])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _cache_read(key: str) -> list[str] | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return list(json.loads((_cache_dir() / f"{key}.json").read_text())["kept_fp32"])
    return None


def _cache_write(key: str, kept: list[str]) -> None:
    with contextlib.suppress(OSError):
        path = _cache_dir() / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"kept_fp32": kept}))
        os.replace(tmp, path)


def quantize_int8(model, measure: Measure, *, metric: str, bound: float,
                  calibrate: Callable[[], None] | None = None, model_id: str | None = None,
                  skip: tuple[str, ...] = ()):
    """Quantize ``model``'s Linear layers to int8 in place and check it; return
    ``(model, QualityReport)``.

    Args:
        measure: compares the model as it is at call time with the fp32 reference the caller
            captured beforehand; returns ``(figure, details)``.
        metric: ``min_cosine`` (higher is better) or ``perplexity_ratio`` (lower is better).
        bound: the figure the model must meet.
        calibrate: runs the fp32 model over calibration inputs (for smoothing and for ranking
            layers); without it, layers are quantized unsmoothed.
        model_id: identifies the weights for the on-disk cache (default: a hash of them).
        skip: suffixes of layer names never to quantize.

    Raises:
        QualityError: no mix of int8 and fp32 layers meets the bound.
    """
    start = time.perf_counter()
    names = [n for n in linear_layers(model) if not any(n.endswith(s) for s in skip)]
    model.eval()
    calib = _Calibration(model, names, calibrate) if calibrate is not None else None
    swap = _Swapper(model, names, calib, SMOOTHING_ALPHA)
    key = _cache_key(model_id or fingerprint(model), metric, bound)

    def trial(kept: set[str]) -> tuple[float, dict[str, float]]:
        swap.use(set(names) - kept)
        with torch.inference_mode():
            return measure(model)

    cached = _cache_read(key)
    kept: set[str] | None = None
    figure, details = 0.0, {}
    if cached is not None and set(cached) <= set(names):
        figure, details = trial(set(cached))
        if _meets(metric, figure, bound):
            kept = set(cached)
    if kept is None:
        cached = None
        figure, details = trial(set())
        if _meets(metric, figure, bound):
            kept = set()
        else:
            kept, figure, details = _search(names, trial, swap, calib, metric, bound)
        _cache_write(key, sorted(kept))
    swap.use(set(names) - kept)
    report = QualityReport(
        method="int8", metric=metric, bound=bound, value=figure, details=details,
        layers_quantized=len(names) - len(kept), layers_total=len(names),
        kept_fp32=sorted(kept), seconds=round(time.perf_counter() - start, 3),
        cached=cached is not None)
    return model, report


def _search(names, trial, swap: _Swapper, calib: _Calibration | None, metric: str,
            bound: float):
    """The fewest layers to keep in fp32, worst first, that make the model meet the bound."""
    better = HIGHER_IS_BETTER[metric]
    if calib is not None:   # cheap: one matmul per layer on its own calibration inputs
        error = {n: calib.error(n, swap.fp32[n], swap.int8[n]) for n in names}
    else:                   # dear: one model evaluation per layer, only it quantized
        error = {}
        for n in names:
            figure = trial(set(names) - {n})[0]
            error[n] = -figure if better else figure
    order = sorted(names, key=lambda n: error[n], reverse=True)   # worst first
    lo, hi, best = 1, len(names) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        figure, details = trial(set(order[:mid]))
        if _meets(metric, figure, bound):
            best, hi = (set(order[:mid]), figure, details), mid - 1
        else:
            lo = mid + 1
    if best is None:
        raise QualityError(
            f"int8 quantization cannot meet {metric} {'>=' if better else '<='} {bound} "
            f"even with {len(names) - 1} of {len(names)} layers kept in fp32; loosen the "
            "bound (accuracy.*) or serve this model with quantize: none")
    return best


def to_bf16(model, measure: Measure, *, metric: str, bound: float):
    """Cast ``model`` to bfloat16 in place and check it like ``quantize_int8``."""
    start = time.perf_counter()
    model.to(torch.bfloat16).eval()
    with torch.inference_mode():
        figure, details = measure(model)
    report = QualityReport("bf16", metric, bound, figure, details,
                           seconds=round(time.perf_counter() - start, 3))
    if not report.passed:
        raise QualityError(f"bf16 misses {metric} bound {bound} (measured {figure:.4f}); "
                           "serve this model with quantize: none")
    return model, report


def unquantized(metric: str, bound: float) -> QualityReport:
    """The report of a model served as it was trained (fp32): identical by construction."""
    value = 1.0
    return QualityReport("none", metric, bound, value, {})
