"""Models users bring: factories for ``model.factory`` / ``train(..., model=...)`` in tests."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


class ByteConvLM(nn.Module):
    """A small causal convolution byte model with tied input and output embeddings."""

    def __init__(self, width: int = 32, kernel: int = 4):
        super().__init__()
        self.kernel = kernel
        self.emb = nn.Embedding(256, width)
        self.conv = nn.Conv1d(width, width, kernel)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)
        self.head.weight = self.emb.weight             # tied: stored once in checkpoints

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx).transpose(1, 2)
        x = self.conv(F.pad(x, (self.kernel - 1, 0))).transpose(1, 2)   # causal
        x = x + self.mlp(x)
        return self.head(self.norm(x))


def build(width: int = 32, kernel: int = 4) -> ByteConvLM:
    return ByteConvLM(width, kernel)


def build_noting_priority(path: str, width: int = 16) -> ByteConvLM:
    """``build``, after appending "PID NICENESS" of the calling process to ``path``."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {os.getpriority(os.PRIO_PROCESS, 0)}\n")
    return build(width=width)


class _TupleOut(ByteConvLM):
    def forward(self, idx):
        return super().forward(idx), {"aux": 0}


def build_tuple(width: int = 16) -> nn.Module:
    return _TupleOut(width)


class _TenClasses(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 10)

    def forward(self, idx):
        return self.emb(idx)


def wrong_vocab() -> nn.Module:
    return _TenClasses()


def not_a_module():
    return 42


def broken(width: int = 8):
    raise RuntimeError("no GPU found")


NOT_CALLABLE = 3
