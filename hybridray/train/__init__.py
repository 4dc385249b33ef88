"""Training on Ray Train, placed by policy: a byte-level GPT, a corpus, DDP across sites.

    from hybridray.train import train, load_train_config
    result = train(load_train_config("configs/train/tiny.yaml", ["train.steps=50"]))
    print(result.checkpoint, result.worker_sites, result.final_eval_loss)

Importing this package imports neither torch nor Ray; the names below load on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "TrainConfig": "hybridray.train.config",
    "load_train_config": "hybridray.train.config",
    "parse_train_config": "hybridray.train.config",
    "GPT": "hybridray.train.model",
    "GPTConfig": "hybridray.train.model",
    "generate": "hybridray.train.model",
    "iter_generate": "hybridray.train.model",
    "load_model": "hybridray.train.model",
    "prepare_corpus": "hybridray.train.corpus",
    "CorpusManifest": "hybridray.train.corpus",
    "RunPlan": "hybridray.train.plan",
    "plan_run": "hybridray.train.plan",
    "TrainResult": "hybridray.train.trainer",
    "train": "hybridray.train.trainer",
    "build_trainer": "hybridray.train.trainer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hybridray.train' has no attribute {name!r}")
