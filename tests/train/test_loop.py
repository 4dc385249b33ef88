"""The worker loop without Ray: data order, schedule, precision, and exact resume."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridray.exceptions import TrainError
from hybridray.train.config import config_from_dict
from hybridray.train.loop import Sampler, Session, lr_at, peak_flops, run_loop
from hybridray.train.model import GPTConfig


def corpus_tokens() -> dict[str, np.ndarray]:
    src = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join((src / name).read_bytes() for name in ("json/decoder.py", "json/encoder.py"))
    toks = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    return {"train": toks[: len(toks) * 9 // 10], "val": toks[len(toks) * 9 // 10:]}


def spec_for(overrides: list[str], tokens=None) -> dict:
    config = config_from_dict({}, overrides=["model.block_size=32", "train.micro_batch=4",
                                             "train.eval_batches=2", "train.warmup_steps=2",
                                             *overrides])
    model = GPTConfig.named(config.model.size, **config.model.overrides())
    return {"config": config.model_dump(mode="json"), "model_config": model.model_dump(),
            "data_class": "restricted", "tokens": tokens or corpus_tokens()}


class LocalSession(Session):
    """One process, checkpoints kept in a local directory (what Ray Train does for us)."""

    def __init__(self, store: Path, resume: bool = False):
        super().__init__(0, 1, 0, torch.device("cpu"), site="onprem")
        self.store, self.resume, self.reports = store, resume, []

    def latest_checkpoint(self):
        found = sorted(self.store.glob("checkpoint-*")) if self.resume else []
        return str(found[-1]) if found else None

    def report(self, metrics, checkpoint_dir, step):
        self.reports.append(metrics)
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, self.store / f"checkpoint-{step:08d}")


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_sampler_order_is_a_pure_function_of_the_cursor():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = Sampler(tokens, 10, seed=1, split="train"), Sampler(tokens, 10, seed=1, split="train")
    assert a.count == 99
    first = a.starts(0, 250)                          # crosses two epoch boundaries
    assert np.array_equal(first[120:130], b.starts(120, 10))
    assert sorted(first[:99] // 10) == list(range(99))   # each epoch is a permutation
    assert not np.array_equal(first[:99], first[99:198])
    x, y = a.batch(first[:3], torch.device("cpu"))
    assert x.shape == (3, 10) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(TrainError, match="the val split has 5 tokens"):
        Sampler(np.arange(5, dtype=np.uint16), 10, seed=1, split="val")


def test_learning_rate_warms_up_then_decays_to_the_floor():
    t = config_from_dict({}, overrides=["train.steps=100", "train.warmup_steps=10",
                                        "train.lr=1.0", "train.min_lr=0.1"]).train
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(55, t) == pytest.approx(0.55)
    assert lr_at(100, t) == pytest.approx(0.1)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(10, 100))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_autocast_runs_on_cpu(precision, tmp_path):
    spec = spec_for([f"train.precision={precision}", "train.steps=6", "train.log_interval=3",
                     "train.eval_interval=6", "train.checkpoint_interval=6"])
    session = LocalSession(tmp_path)
    metrics = run_loop(spec, session)
    assert metrics["precision"] == precision and np.isfinite(metrics["loss"])
    assert metrics["eval_history"][-1][1] < metrics["eval_history"][0][1]
    assert metrics["site"] == "onprem" and metrics["worker_sites"] == ["onprem"]
    assert {"tokens_per_s", "mfu", "workers_per_site", "lr"} <= set(metrics)
    opt = torch.load(tmp_path / "checkpoint-00000006" / "optimizer.pt", weights_only=True)
    assert (opt["scaler"] is not None) == (precision == "fp16")   # GradScaler for fp16 only


def test_resume_continues_exactly_where_the_checkpoint_left_off(tmp_path):
    common = ["train.steps=10", "train.checkpoint_interval=5", "train.log_interval=5",
              "train.eval_interval=5", "train.grad_accum=2", "model.dropout=0.1"]
    straight = run_loop(spec_for(common), LocalSession(tmp_path / "a"))

    store = tmp_path / "b"
    first = LocalSession(store)
    run_loop(spec_for(common), first)
    shutil.rmtree(store / "checkpoint-00000010")       # as if it died after step 5's checkpoint
    resumed = LocalSession(store, resume=True)
    out = run_loop(spec_for(common), resumed)
    assert out["resumed_from_step"] == 5 and out["step"] == 10
    assert out["loss"] == pytest.approx(straight["loss"], rel=1e-5)
    assert [s for s, _ in out["eval_history"]] == [0, 5, 10]
    assert [v for _, v in out["eval_history"]] == pytest.approx(
        [v for _, v in straight["eval_history"]], rel=1e-5)
    state = (store / "checkpoint-00000010" / "state.json").read_text()
    assert '"cursor": 80' in state                    # 10 steps x 4 sequences x 2 micro-steps


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path):
    run_loop(spec_for(["train.steps=2", "train.checkpoint_interval=2"]), LocalSession(tmp_path))
    with pytest.raises(TrainError, match=r"model_config\.json: the checkpoint's model differs "
                                         r"from this run's: n_layer=2 \(this run: 3\)"):
        run_loop(spec_for(["train.steps=4", "model.n_layer=3"]),
                 LocalSession(tmp_path, resume=True))


@pytest.mark.parametrize(("gpu", "precision", "peak"), [
    ("NVIDIA H200", "bf16", 989e12), ("NVIDIA H100 80GB HBM3", "fp16", 989e12),
    ("NVIDIA H200", "fp32", 494.7e12), ("NVIDIA A100-SXM4-80GB", "fp32", 156e12),
    ("Some Future GPU", "bf16", 100e12)])
def test_gpu_mfu_peak_is_the_tensor_core_peak_the_run_uses(monkeypatch, gpu, precision, peak):
    """fp32 runs use TF32 tensor cores (the loop allows them on CUDA): their MFU divides by
    the TF32 peak; dividing by plain fp32's read 198% on an H200."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    config = config_from_dict({}, overrides=[f"train.precision={precision}"])
    assert peak_flops(config, torch.device("cuda", 0)) == peak
    assert peak_flops(config_from_dict({}, overrides=["metrics.peak_flops=1e12"]),
                      torch.device("cuda", 0)) == 1e12
