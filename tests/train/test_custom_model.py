"""Your own model in the training loop: the factory contract, checkpoints, resume, refusals.

The loop runs in this process (as in test_loop.py); the cluster path is in
test_train_cluster.py. The factories live in tests/train/custom_models.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hybridray.exceptions import ConfigError, TrainError
from hybridray.train.checkpoint import CheckpointReader, read_header
from hybridray.train.config import config_from_dict
from hybridray.train.kinds import (
    CustomKind,
    CustomModelConfig,
    import_factory,
    kind_of,
)
from hybridray.train.loop import run_loop
from hybridray.train.model import load_model
from tests.train import custom_models
from tests.train.test_loop import LocalSession, spec_for

FACTORY = "tests.train.custom_models:build"


def custom_spec(overrides: list[str], factory: str = FACTORY, kwargs: dict | None = None,
                fn=None) -> dict:
    spec = spec_for(overrides)
    block = json.loads(json.dumps(spec["config"]))["model"]["block_size"]
    spec["model_config"] = CustomModelConfig(factory=factory, kwargs=kwargs or {},
                                             block_size=block).model_dump()
    spec["model_fn"] = fn
    return spec


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_own_model_trains_checkpoints_its_own_state_dict_and_loads_back(tmp_path):
    store = tmp_path / "ck"
    out = run_loop(custom_spec(["train.steps=40", "train.checkpoint_interval=40",
                                "train.eval_interval=20", "train.lr=3e-3"],
                               kwargs={"width": 24}), LocalSession(store))
    (_, first), *_, (_, last) = out["eval_history"]
    assert last < first - 0.5                                    # it learned something
    model = custom_models.build(width=24)
    assert out["params"] == sum(p.numel() for p in model.parameters())
    assert out["mfu"] > 0

    ck = store / "checkpoint-00000040"
    config = json.loads((ck / "model_config.json").read_text())
    assert config == {"kind": "custom", "factory": FACTORY, "kwargs": {"width": 24},
                      "block_size": 32, "vocab_size": 256}
    # The user's own tensor names; the tied output layer is stored once.
    shapes = read_header(CheckpointReader(ck))
    assert "emb.weight" in shapes and "head.weight" not in shapes
    assert set(shapes) | {"head.weight"} == set(model.state_dict())

    loaded, meta = load_model(ck)                                 # imports the factory again
    assert isinstance(loaded, custom_models.ByteConvLM)
    assert meta["model_config"]["factory"] == FACTORY
    assert loaded.head.weight is loaded.emb.weight               # still tied after loading
    x = torch.randint(0, 256, (2, 32))
    torch.manual_seed(0)
    assert loaded(x).shape == (2, 32, 256)


def test_own_model_resumes_exactly_where_the_checkpoint_left_off(tmp_path):
    common = ["train.steps=10", "train.checkpoint_interval=5", "train.log_interval=5",
              "train.eval_interval=5"]
    straight = run_loop(custom_spec(common), LocalSession(tmp_path / "a"))
    store = tmp_path / "b"
    run_loop(custom_spec(common), LocalSession(store))
    shutil.rmtree(store / "checkpoint-00000010")
    out = run_loop(custom_spec(common), LocalSession(store, resume=True))
    assert out["resumed_from_step"] == 5 and out["step"] == 10
    assert out["loss"] == pytest.approx(straight["loss"], rel=1e-5)


def test_a_factory_passed_as_a_callable_trains_without_an_import_path(tmp_path):
    out = run_loop(custom_spec(["train.steps=4", "train.checkpoint_interval=4"],
                               factory="__main__:closure",
                               fn=lambda: custom_models.build_tuple(width=16)),
                   LocalSession(tmp_path))
    assert out["step"] == 4                              # a (logits, extra) tuple is accepted


def test_resume_refuses_weights_of_another_shape_or_kind(tmp_path):
    run_loop(custom_spec(["train.steps=2", "train.checkpoint_interval=2"]),
             LocalSession(tmp_path))
    with pytest.raises(TrainError, match=r"model\.safetensors: does not match the model "
                                         r"tests\.train\.custom_models:build builds "
                                         r"\(.*emb\.weight is \(256, 32\), expected \(256, 48\)"):
        run_loop(custom_spec(["train.steps=4"], kwargs={"width": 48}),
                 LocalSession(tmp_path, resume=True))
    with pytest.raises(TrainError, match=r"model_config\.json: the checkpoint holds a custom "
                                         r"model \(tests\.train\.custom_models:build\), this "
                                         r"run trains GPT"):
        run_loop(spec_for(["train.steps=4"]), LocalSession(tmp_path, resume=True))


def test_a_model_that_is_not_a_byte_language_model_is_named(tmp_path):
    with pytest.raises(TrainError, match=r"custom_models:wrong_vocab: for token ids of shape "
                                         r"\(4, 32\) the model returned \(4, 32, 10\); .* "
                                         r"logits of shape \(batch, T, 256\)"):
        run_loop(custom_spec(["train.steps=2"], factory="tests.train.custom_models:wrong_vocab"),
                 LocalSession(tmp_path))


@pytest.mark.parametrize("factory, message", [
    ("no_such_pkg.models:build", r"cannot import module 'no_such_pkg\.models' \(No module "
                                 r"named 'no_such_pkg'\); make it importable on the driver "
                                 r"and on every worker"),
    ("tests.train.custom_models:nope", r"module 'tests\.train\.custom_models' has no 'nope'"),
    ("tests.train.custom_models:NOT_CALLABLE", r"'NOT_CALLABLE' is a int, not a callable"),
])
def test_factories_that_cannot_be_used_say_why(factory, message):
    with pytest.raises(TrainError, match=message):
        import_factory(factory)


@pytest.mark.parametrize("factory, message", [
    ("not_a_module", r"returned a int, not a torch\.nn\.Module"),
    ("broken", r"raised RuntimeError: no GPU found \(called with model\.kwargs \{\}\)"),
])
def test_factories_that_build_no_module_say_why(factory, message):
    kind = kind_of({"kind": "custom", "factory": f"tests.train.custom_models:{factory}",
                    "block_size": 8})
    assert isinstance(kind, CustomKind)
    with pytest.raises(TrainError, match=message):
        kind.build()


@pytest.mark.parametrize("overrides, message", [
    (["model.factory=mymodels.build"], r"model\.factory: 'mymodels\.build' is not an import "
                                        r"path MODULE:CALLABLE"),
    (["model.factory=m:build", "model.n_layer=4"], r"model\.n_layer: .*shapes the built-in "
                                                   r"GPT; with model\.factory pass"),
    (["model.kwargs.width=4"], r"model\.kwargs: .*are for model\.factory, which is not set"),
])
def test_config_refuses_mixed_model_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, overrides=overrides)


def test_serving_refuses_a_checkpoint_of_your_own_model(tmp_path):
    from hybridray.serve.config import parse_serve_config
    from hybridray.serve.plan import plan_service
    from tests.serve.conftest import local_topology

    run_loop(custom_spec(["train.steps=1", "train.checkpoint_interval=1"]),
             LocalSession(tmp_path))
    text = f"""
name: lm
models:
  - name: mine
    kind: completion
    source: {tmp_path / "checkpoint-00000001"}
    sites: {{onprem: {{}}}}
"""
    with pytest.raises(ConfigError, match=r"models\.mine: source .* holds your own model "
                                          r"\(tests\.train\.custom_models:build\); the "
                                          r"completion route serves hybridray GPT"):
        plan_service(parse_serve_config(text), local_topology())


def test_own_model_sees_byte_0_where_the_corpus_ends_a_document(tmp_path):
    """Real corpora end every document with EOT (256), which a byte model's 256-row
    embedding has no row for; the loop hands it byte 0 there instead of crashing."""
    import numpy as np

    toks = np.frombuffer(b"def f():\n    return 1\n" * 40, dtype=np.uint8).astype(np.uint16)
    toks = toks.copy()
    toks[::17] = 256                                     # an end of document every 17 bytes
    spec = custom_spec(["train.steps=4", "train.eval_interval=4"], kwargs={"width": 16})
    spec["tokens"] = {"train": toks, "val": toks[:200]}
    out = run_loop(spec, LocalSession(tmp_path / "ck"))
    assert out["step"] == 4 and all(np.isfinite(loss) for _, loss in out["eval_history"])
