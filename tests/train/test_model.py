"""The GPT, its generation, and the checkpoint contract (no Ray needed)."""

from __future__ import annotations

import json

import pytest
import torch

from hybridray.exceptions import TrainError
from hybridray.train import checkpoint as ckpt
from hybridray.train.model import (
    EOT,
    GPT,
    SIZES,
    GPTConfig,
    KVCache,
    generate,
    iter_generate,
    load_model,
)

META = {"data_class": "restricted", "site": "onprem", "tokenizer": "bytes"}


def test_named_sizes_reach_gpt2_shape():
    assert list(SIZES) == ["tiny", "small", "medium", "gpt2-124m"]
    cfg = GPTConfig.named("gpt2-124m")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    with torch.device("meta"):
        n = GPT(cfg).num_params()
    assert 84e6 < n < 87e6      # GPT-2 small's transformer; its 124M counts a 50257 embedding
    assert GPTConfig.named("tiny", n_layer=3).n_layer == 3


def test_unknown_size_lists_valid_ones():
    with pytest.raises(TrainError, match="unknown model size 'huge'.*tiny, small, medium, "
                                         "gpt2-124m"):
        GPTConfig.named("huge")
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=65, n_head=2)


def test_kv_cache_matches_a_full_forward():
    torch.manual_seed(0)
    model = GPT.from_size("tiny").eval()
    x = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache(model.config, 2, x.device, torch.float32)
        parts = [model(x[:, :7], cache=cache)[0]]
        parts.append(model(x[:, 7:12], cache=cache)[0])      # a chunk after a prefix
        parts += [model(x[:, i:i + 1], cache=cache)[0] for i in range(12, 30)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def _memorised(text: bytes, steps: int = 100) -> GPT:
    """A tiny model that has learnt ``text`` repeated, as a document after EOT."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig.named("tiny", block_size=32))
    row = torch.tensor([EOT, *(text * (33 // len(text) + 1))][:33])
    rows = row.repeat(8, 1)
    opt = model.optimizer(3e-3, 0.0, (0.9, 0.95))
    first = None
    for _ in range(steps):
        _, loss = model(rows[:, :-1], rows[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 100      # it learns
    return model


@pytest.fixture(scope="module")
def hello():
    return _memorised(b"hello world\n")


def test_generate_greedy_stop_and_limits(hello):
    out = generate(hello, b"hello", max_new_tokens=40, temperature=0)
    assert out.startswith(b" world\nhello")
    assert generate(hello, b"hello", max_new_tokens=40, temperature=0, stop=b"\n") == b" world"
    assert generate(hello, b"hello", max_new_tokens=40, temperature=0, stop=["xyz", "ld\n"]) \
        == b" wor"
    assert len(generate(hello, "hello", max_new_tokens=5, temperature=0)) == 5
    assert generate(hello, b"hello", max_new_tokens=0) == b""
    assert generate(hello, b"hello", 20, temperature=1.0, top_k=1) == \
        generate(hello, b"hello", 20, temperature=0)
    a = generate(hello, b"hel", 30, temperature=1.2, top_p=0.9, seed=7)
    assert a == generate(hello, b"hel", 30, temperature=1.2, top_p=0.9, seed=7)


def test_streaming_never_yields_part_of_a_stop_sequence(hello):
    chunks = list(iter_generate(hello, b"hello", 40, temperature=0, stop=b"ld\nhel"))
    assert b"".join(chunks) == b" wor"
    assert all(isinstance(c, bytes) and c for c in chunks)


def test_generation_slides_past_the_context(hello):
    out = generate(hello, b"hello world\n" * 4, max_new_tokens=80, temperature=0)
    assert len(out) == 80 and b"world" in out


def _save(tmp_path, model, **state):
    opt = model.optimizer(1e-3, 0.1, (0.9, 0.95))
    return ckpt.save_checkpoint(tmp_path / "ck", model, optimizer={"optimizer": opt.state_dict()},
                                state={"step": 7, "data": {"cursor": 99}, **state}, meta=META)


def test_checkpoint_round_trip(tmp_path, hello):
    path = _save(tmp_path, hello)
    assert sorted(p.name for p in path.iterdir()) == sorted(ckpt.ALL_FILES)
    model, meta = load_model(str(path))
    assert meta["data_class"] == "restricted" and meta["site"] == "onprem"
    assert meta["tokenizer"] == "bytes" and meta["step"] == 7
    assert GPTConfig(**meta["model_config"]) == hello.config
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x)[0], hello.eval()(x)[0])
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    import pyarrow.fs as pafs

    model2, _ = load_model(str(path), pafs.LocalFileSystem())
    assert generate(model2, b"hello", 12, temperature=0) == generate(hello, b"hello", 12,
                                                                       temperature=0)


def test_corrupt_or_mismatched_checkpoints_name_the_file(tmp_path):
    model = GPT.from_size("tiny")
    path = _save(tmp_path, model)
    weights = path / ckpt.MODEL_FILE
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])           # truncated
    for load in (lambda: load_model(path), lambda: ckpt.inspect_checkpoint(str(path))):
        with pytest.raises(TrainError, match=r"model\.safetensors"):
            load()
    weights.write_bytes(b"\x00" * 64)                      # not safetensors at all
    with pytest.raises(TrainError, match=r"model\.safetensors: corrupt"):
        ckpt.inspect_checkpoint(str(path))
    weights.write_bytes(good)

    cfg = path / ckpt.CONFIG_FILE
    cfg.write_text(json.dumps({**model.config.model_dump(), "n_layer": 3}))
    with pytest.raises(TrainError, match=r"model\.safetensors: does not match "
                                         r"model_config\.json \(missing transformer\.h\.2"):
        load_model(path)
    cfg.write_text("{not json")
    with pytest.raises(TrainError, match=r"model_config\.json: corrupt JSON"):
        load_model(path)
    cfg.write_text(json.dumps({**model.config.model_dump(), "n_experts": 8}))
    with pytest.raises(TrainError, match=r"model_config\.json: not a valid GPT config"):
        load_model(path)
    cfg.unlink()
    with pytest.raises(TrainError, match=r"missing model_config\.json"):
        load_model(path)
    with pytest.raises(TrainError, match="no such checkpoint directory"):
        load_model(tmp_path / "nowhere")


def test_checkpoint_meta_must_be_bytes_level(tmp_path):
    path = _save(tmp_path, GPT.from_size("tiny"))
    (path / ckpt.META_FILE).write_text(json.dumps({**META, "tokenizer": "gpt2-bpe"}))
    with pytest.raises(TrainError, match=r"hybridray\.json: tokenizer 'gpt2-bpe'"):
        load_model(path)
    (path / ckpt.META_FILE).write_text(json.dumps({"site": "onprem", "tokenizer": "bytes"}))
    with pytest.raises(TrainError, match=r"hybridray\.json: missing data_class"):
        load_model(path)


def test_eot_is_never_emitted(hello):
    out = generate(hello, b"", max_new_tokens=30, temperature=2.0, seed=3)
    assert isinstance(out, bytes) and all(b < 256 for b in out) and EOT == 256
