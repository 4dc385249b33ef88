"""A GPT-style byte-level decoder: the model hybridray trains, checkpoints and serves.

Bytes are the tokens (ids 0-255) plus one special, ``EOT`` (256), which ends every document
of the corpus; the embedding is padded to ``VOCAB_SIZE`` (320, a multiple of 64) so matrix
shapes stay fast on GPUs. No tokenizer files are needed anywhere, so any site can train or
serve a checkpoint with nothing but the checkpoint directory.

Sizes go from ``tiny`` (a few hundred thousand parameters, for tests on a laptop) to
``gpt2-124m``, the transformer shape of GPT-2 small (12 layers, 12 heads, 768 wide, 1024
context). With a byte vocabulary that shape has ~85M parameters: GPT-2's 124M counts a
50257-token embedding. Attention goes through ``F.scaled_dot_product_attention`` (flash or
memory-efficient kernels where the device has them); generation uses a key/value cache.

    from hybridray.train.model import GPT, GPTConfig, generate, load_model
    model, meta = load_model("/path/to/checkpoint")        # see docs/training.md
    print(generate(model, b"def fib(n):", max_new_tokens=64, temperature=0.8, top_k=40))
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.nn import functional as F

from hybridray.exceptions import TrainError

BYTE_VOCAB = 256
EOT = 256                 # end of text: separates documents; generation stops on it
VOCAB_SIZE = 320          # 256 bytes + specials, padded to a multiple of 64
TOKENIZER = "bytes"

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
    "medium": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
    "gpt2-124m": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
}


class GPTConfig(BaseModel):
    """The shape of a ``GPT``; stored as ``model_config.json`` in every checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_layer: int = Field(2, ge=1, le=256, description="Transformer blocks.")
    n_head: int = Field(2, ge=1, le=256, description="Attention heads per block.")
    n_embd: int = Field(64, ge=8, le=65536, description="Width of the residual stream.")
    block_size: int = Field(64, ge=2, le=1 << 20, description="Context length in tokens.")
    vocab_size: int = Field(VOCAB_SIZE, ge=EOT + 1, le=1 << 20,
                            description="Embedding rows: 256 bytes + specials, padded.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout in training.")
    bias: bool = Field(True, description="Biases in Linear and LayerNorm layers.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head "
                             f"({self.n_head})")
        return self

    @classmethod
    def named(cls, size: str, **overrides: Any) -> GPTConfig:
        """The named size (``tiny``, ``small``, ``medium``, ``gpt2-124m``) with overrides.

        Raises:
            TrainError: ``size`` is not one of the named sizes.
        """
        if size not in SIZES:
            raise TrainError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
        return cls(**{**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class KVCache:
    """Keys and values of every layer for the tokens seen so far (one sequence batch)."""

    def __init__(self, config: GPTConfig, batch: int, device: torch.device,
                 dtype: torch.dtype):
        shape = (batch, config.n_head, config.block_size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0          # tokens stored (same for every layer once a forward finishes)
        self.capacity = config.block_size

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask, causal = None, T > 1
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k.to(cache.k[0].dtype), v.to(cache.v[0].dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
            if past and T > 1:  # new tokens see the whole past and each other causally
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
                causal = False
            elif past:
                causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A pre-LayerNorm GPT-2 style decoder with tied input and output embeddings."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "wpe": nn.Embedding(config.block_size, config.n_embd),
            "drop": nn.Dropout(config.dropout),
            "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            "ln_f": nn.LayerNorm(config.n_embd, bias=config.bias),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> GPT:
        """A freshly initialised model of a named size (see ``SIZES``)."""
        return cls(GPTConfig.named(size, **overrides))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; without the position embedding by default (the token embedding is
        tied to the output layer, so it counts once, as compute does)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N plus attention's 12·L·H·Q·T (PaLM, appendix B)."""
        c = self.config
        t = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * t

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, last_only: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) — or (B, 1, vocab) with ``last_only`` — and the mean
        cross-entropy against ``targets`` (positions with target -1 are ignored)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's "
                             f"block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float],
                  fused: bool | None = None) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices only (not biases, norms or embeddings' rows)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if fused is None:
            fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


# ---- generation ---------------------------------------------------------------------------

def encode(text: bytes | str) -> list[int]:
    """Token ids of ``text`` (UTF-8 for ``str``): its bytes."""
    return list(text.encode() if isinstance(text, str) else bytes(text))


def _stops(stop: bytes | str | Sequence[bytes | str] | None) -> list[bytes]:
    if stop is None:
        return []
    if isinstance(stop, (bytes, str)):
        stop = [stop]
    out = [s.encode() if isinstance(s, str) else bytes(s) for s in stop]
    return [s for s in out if s]


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> int:
    logits = logits.float()
    logits[EOT + 1:] = -float("inf")          # padding rows are never tokens
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > top_p     # keep the smallest set reaching top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def iter_generate(model: GPT, prompt: bytes | str, max_new_tokens: int, *,
                  temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, stop: bytes | str | Sequence[bytes | str] | None
                  = None, seed: int | None = None) -> Iterator[bytes]:
    """Yield the continuation of ``prompt`` in chunks of bytes as they are sampled.

    The prompt follows an ``EOT`` (as every document of the corpus does). Sampling ends at
    ``EOT``, after ``max_new_tokens`` tokens, or at a ``stop`` sequence, which is not
    yielded; bytes that might begin a stop sequence are held back until they cannot. A
    chunk may end inside a multi-byte UTF-8 character: decode the joined bytes.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    stops = _stops(stop)
    keep = max((len(s) for s in stops), default=1) - 1
    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    context = [EOT, *encode(prompt)][-cfg.block_size:]
    pending = b""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = KVCache(cfg, 1, device, dtype)
            logits, _ = model(torch.tensor([context], device=device), cache=cache,
                              last_only=True)
            for _ in range(max_new_tokens):
                token = _sample(logits[0, -1], temperature, top_k, top_p, generator)
                if token >= BYTE_VOCAB:
                    break
                pending += bytes([token])
                hit = next((s for s in stops if s in pending), None)
                if hit is not None:
                    pending = pending[:pending.index(hit)]
                    break
                if len(pending) > keep:
                    yield pending[:len(pending) - keep]
                    pending = pending[len(pending) - keep:]
                context.append(token)
                if cache.length >= cfg.block_size:  # slide: recompute on the last half
                    context = context[-(cfg.block_size // 2):]
                    cache = KVCache(cfg, 1, device, dtype)
                    logits, _ = model(torch.tensor([context], device=device), cache=cache,
                                      last_only=True)
                else:
                    logits, _ = model(torch.tensor([[token]], device=device), cache=cache)
        if pending:
            yield pending
    finally:
        model.train(was_training)


def generate(model: GPT, prompt_bytes: bytes | str, max_new_tokens: int = 256,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop: bytes | str | Sequence[bytes | str] | None = None,
             seed: int | None = None) -> bytes:
    """The continuation of ``prompt_bytes`` (not including it), as bytes.

    Args:
        model: a ``GPT`` (e.g. from ``load_model``), on any device.
        prompt_bytes: the prompt; a ``str`` is UTF-8 encoded.
        max_new_tokens: at most this many bytes are generated.
        temperature: 0 picks the most likely byte (greedy); higher is more random.
        top_k: sample only among the ``k`` most likely bytes.
        top_p: sample only among the most likely bytes whose probabilities sum to ``p``.
        stop: a sequence (or several) that ends generation; it is not included.
        seed: makes sampling reproducible.
    """
    return b"".join(iter_generate(model, prompt_bytes, max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, stop=stop, seed=seed))


def load_model(checkpoint_dir: Any, filesystem: Any = None, *, device: str | torch.device
               = "cpu", dtype: torch.dtype | None = None, factory: Any = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by hybridray training: ``(model, meta)``.

    The model is a ``GPT``, or for a run of your own model (``model.factory``) the module
    its factory builds: the factory recorded in the checkpoint is imported again, unless
    ``factory`` (the callable) is given.

    ``checkpoint_dir`` is a local directory, a ``file://``/``s3://``/``gs://`` URI, a path
    inside ``filesystem`` (a ``pyarrow.fs.FileSystem``, e.g. from ``site_filesystem``) or a
    ``ray.train.Checkpoint``. ``meta`` holds ``hybridray.json`` (``data_class``, ``site``,
    ``tokenizer``, ...) plus ``step`` and ``model_config``. See ``hybridray.train.checkpoint``.

    Raises:
        TrainError: a file is missing, corrupt or does not match ``model_config.json``; the
            message names the file.
    """
    from hybridray.train.checkpoint import load_model as _load

    return _load(checkpoint_dir, filesystem, device=device, dtype=dtype, factory=factory)
