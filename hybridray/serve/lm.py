"""The language model behind ``/v1/completions``: a hybridray checkpoint, sampled token by token.

The model and its checkpoint format come from training (``hybridray.train.model``); this
module adds what an OpenAI-style API needs on top of the forward pass: sampling with
temperature / top-p / top-k, presence and frequency penalties, logit bias, stop sequences
(held back while they might still be forming), log-probabilities, echo, ``n`` choices,
reproducible seeds, and a perplexity check of the quantized model against fp32.

Tokens are bytes (0-255) plus ``EOT``; every prompt follows an ``EOT``, as every document of
the training corpus does. Text is decoded from bytes with an incremental UTF-8 decoder, so a
character split across two tokens is never shown half.
"""

from __future__ import annotations

import codecs
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hybridray.serve import calibration
from hybridray.serve.quantize import QualityReport, quantize_int8, to_bf16, unquantized


class InputError(ValueError):
    """A request this model cannot answer as asked (a 400 for the client, not a crash)."""


@dataclass
class Sampling:
    """One choice's sampling parameters (already validated against the service limits)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: list[bytes] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None


@dataclass
class Step:
    """What one generation step adds to a choice: text that is final, and token details."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


def token_text(token: int) -> str:
    """How a byte token is shown in ``logprobs`` (OpenAI shows partial bytes as bytes:\\xNN)."""
    if token < 128:
        return chr(token)
    return f"bytes:\\x{token:02x}"


class LanguageModel:
    """A byte-level GPT checkpoint, optionally int8, with its quality report."""

    def __init__(self, source: str, *, quantize: str = "int8", max_perplexity_ratio: float = 1.05,
                 device: str = "cpu"):
        from hybridray.train.model import load_model

        self.model, self.meta = load_model(source, device=device)
        self.model.eval()
        self.source = source
        self.block_size = int(self.model.config.block_size)
        self.vocab = int(self.model.config.vocab_size)
        self.data_class = str(self.meta.get("data_class", "public"))
        self.lock = threading.Lock()     # KV caches are per call; the lock guards stats only
        text = calibration.PROSE.encode()
        reference = self.perplexity(text)

        def measure(_model) -> tuple[float, dict[str, float]]:
            ppl = self.perplexity(text)
            return ppl / reference, {"perplexity": ppl, "perplexity_fp32": reference}

        if quantize == "int8":
            _, self.report = quantize_int8(self.model, measure, metric="perplexity_ratio",
                                           bound=max_perplexity_ratio,
                                           calibrate=lambda: self.perplexity(text))
        elif quantize == "bf16":
            _, self.report = to_bf16(self.model, measure, metric="perplexity_ratio",
                                     bound=max_perplexity_ratio)
        else:
            self.report: QualityReport = unquantized("perplexity_ratio", max_perplexity_ratio)
            self.report.details = {"perplexity": reference, "perplexity_fp32": reference}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- scoring ------------------------------------------------------------------------
    @torch.inference_mode()
    def perplexity(self, data: bytes) -> float:
        """exp(mean next-byte cross-entropy) of ``data`` read after an EOT, window by window."""
        from hybridray.train.model import EOT

        ids = [EOT, *data]
        total, count = 0.0, 0
        step = self.block_size
        for start in range(0, len(ids) - 1, step):
            chunk = ids[start:start + step + 1]
            if len(chunk) < 2:
                break
            x = torch.tensor([chunk[:-1]], device=self.device)
            y = torch.tensor([chunk[1:]], device=self.device)
            _, loss = self.model(x, y)
            total += float(loss) * (len(chunk) - 1)
            count += len(chunk) - 1
        return math.exp(total / max(count, 1))

    def check_prompt(self, prompt: bytes) -> None:
        if len(prompt) + 1 > self.block_size:
            raise InputError(f"the prompt is {len(prompt)} tokens (bytes); this model reads at "
                             f"most {self.block_size - 1}")

    # -- generation ---------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt: bytes, params: Sampling, *, echo: bool = False,
                 cancelled: threading.Event | None = None) -> Iterator[Step]:
        """Yield ``Step``s of one choice; the last has ``finish_reason`` set.

        Raises:
            InputError: the prompt does not fit the context, or a logit_bias id is no token.
        """
        from hybridray.train.model import BYTE_VOCAB, EOT, KVCache

        self.check_prompt(prompt)
        bad = [t for t in params.logit_bias if not 0 <= t <= EOT]
        if bad:
            raise InputError(f"logit_bias: {bad[0]} is not a token of this model (0-{EOT})")
        model, cfg, device = self.model, self.model.config, self.device
        dtype = next(model.parameters()).dtype
        gen = torch.Generator(device=device)
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        context = [EOT, *prompt]
        cache = KVCache(cfg, 1, device, dtype)
        logits, _ = model(torch.tensor([context], device=device), cache=cache,
                          last_only=not (echo and params.logprobs is not None))
        if echo:
            first = Step(text=decoder.decode(prompt))
            if params.logprobs is not None:   # logits[0, i] predicts prompt[i] (after EOT)
                lp = F.log_softmax(logits[0, :, :EOT + 1].float(), dim=-1)
                first.tokens = [token_text(t) for t in prompt]
                first.token_logprobs = [float(lp[i, t]) for i, t in enumerate(prompt)]
                first.top_logprobs = [self._top(lp[i], params.logprobs)
                                      for i in range(len(prompt))]
            yield first
            logits = logits[:, -1:, :]
        stops = params.stop
        keep = max((len(s) for s in stops), default=1) - 1
        counts = torch.zeros(self.vocab, device=device)
        pending = b""
        held: list[tuple[int, float | None, dict | None]] = []
        produced = 0
        finish = "length"
        for _ in range(params.max_tokens):
            if cancelled is not None and cancelled.is_set():
                break
            raw = logits[0, -1].float()
            token, logprob, top = self._sample(raw, counts, params, gen)
            if token >= BYTE_VOCAB:     # EOT: the model ends the document
                finish = "stop"
                break
            produced += 1
            counts[token] += 1
            pending += bytes([token])
            held.append((token, logprob, top))
            hit = next((s for s in stops if s in pending), None)
            if hit is not None:
                cut = pending.index(hit)
                pending = pending[:cut]
                held = held[:cut] if cut <= len(held) else held
                finish = "stop"
                break
            if len(pending) > keep:
                n_out = len(pending) - keep
                yield self._step(decoder, pending[:n_out], held[:n_out], params)
                pending, held = pending[n_out:], held[n_out:]
            context.append(token)
            if cache.length >= cfg.block_size:  # slide the window: recompute on the last half
                context = context[-(cfg.block_size // 2):]
                cache = KVCache(cfg, 1, device, dtype)
                logits, _ = model(torch.tensor([context], device=device), cache=cache,
                                  last_only=True)
            else:
                logits, _ = model(torch.tensor([[token]], device=device), cache=cache)
        last = self._step(decoder, pending, held, params, final=True)
        last.finish_reason = finish
        last.completion_tokens = produced
        yield last

    def _step(self, decoder, data: bytes, held, params: Sampling, final: bool = False) -> Step:
        step = Step(text=decoder.decode(data, final=final))
        if params.logprobs is not None:
            step.tokens = [token_text(t) for t, _, _ in held]
            step.token_logprobs = [lp for _, lp, _ in held]
            step.top_logprobs = [top for _, _, top in held]
        return step

    @staticmethod
    def _top(logprobs: torch.Tensor, k: int) -> dict[str, float] | None:
        if k <= 0:
            return None
        from hybridray.train.model import EOT

        values, ids = torch.topk(logprobs[:EOT + 1], k)
        return {token_text(int(i)) if int(i) < 256 else "<|endoftext|>": float(v)
                for v, i in zip(values, ids, strict=True)}

    def _sample(self, raw: torch.Tensor, counts: torch.Tensor, p: Sampling, gen):
        from hybridray.train.model import EOT

        logits = raw.clone()
        logits[EOT + 1:] = -float("inf")               # padding rows are never tokens
        if p.frequency_penalty or p.presence_penalty:
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        for tok, bias in p.logit_bias.items():
            logits[tok] += bias
        if p.temperature <= 0:
            token = int(torch.argmax(logits))
        else:
            # Shift so the best logit is 0 and divide in float64: a tiny temperature
            # (1e-320 is a valid float the schema admits) then sends the rest to -inf
            # instead of inf/inf = nan, and the limit T -> 0 stays argmax-like sampling.
            shifted = logits.double() - logits.max().double()
            scaled = shifted / p.temperature
            if p.top_k is not None and p.top_k < EOT + 1:
                kth = torch.topk(scaled, p.top_k).values[-1]
                scaled[scaled < kth] = -float("inf")
            probs = F.softmax(scaled, dim=-1)
            if p.top_p < 1:
                sorted_p, order = torch.sort(probs, descending=True)
                sorted_p[sorted_p.cumsum(0) - sorted_p > p.top_p] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
                probs /= probs.sum()
            token = int(torch.multinomial(probs, 1, generator=gen))
        if p.logprobs is None:
            return token, None, None
        lp = F.log_softmax(raw.float()[:EOT + 1], dim=-1)
        return token, float(lp[token]), self._top(lp, p.logprobs)
