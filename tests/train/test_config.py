"""Train configs: every shipped YAML loads, and every mistake gets one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hybridray.exceptions import ConfigError
from hybridray.train.config import TrainConfig, load_train_config, parse_train_config
from tests.paths import ROOT

CONFIGS = sorted((ROOT / "configs" / "train").rglob("*.yaml"))


def test_there_are_configs_to_check():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_says_how_to_run_it(path):
    config = load_train_config(path)
    assert isinstance(config, TrainConfig)
    head = path.read_text().splitlines()[:4]
    assert head[0].startswith("#")
    rel = path.relative_to(ROOT)
    assert any(f"hybridray train {rel}" in line and "=" not in line for line in head), head
    assert any(f"hybridray train {rel} " in line and "=" in line for line in head), head


def test_defaults_are_the_stdlib_restricted_corpus():
    config = parse_train_config("")
    assert config.data.source == "stdlib"
    assert config.data.data_class is None  # the cluster's default_data_class (restricted)
    assert config.wan.mode == "fp32" and config.train.precision == "fp32"


def test_overrides_apply_before_validation(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("name: a\ntrain:\n  steps: 10\n")
    config = load_train_config(path, ["train.steps=20", "wan.mode=powersgd",
                                      "train.workers=[1, 3]", "model.size=small"])
    assert config.train.steps == 20 and config.wan.mode == "powersgd"
    assert config.train.workers == (1, 3)
    assert (config.train.min_workers, config.train.max_workers) == (1, 3)


def test_every_problem_is_reported_with_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: Bad_Name\nmodel:\n  size: huge\ntrain:\n  precision: fp8\n"
                    "  step: 10\nwan:\n  mode: zip\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(path)
    text = str(e.value)
    assert f"{path}: name:" in text
    assert f"{path}: model.size: unknown model size 'huge'" in text
    assert "valid: tiny, small, medium, gpt2-124m" in text
    assert f"{path}: train.precision: Input should be 'fp32', 'bf16' or 'fp16' (got 'fp8')" in text
    assert f"{path}: train.step: unknown key; did you mean 'steps'?" in text
    assert f"{path}: wan.mode:" in text and "'powersgd'" in text
    assert len(e.value.problems) == 5


@pytest.mark.parametrize("override, message", [
    ("train.workers=[3, 1]", "train.workers: needs 1 <= min <= max"),
    ("train.min_lr=1", "train.min_lr: must be <= lr"),
    ("wan.mode=localsgd", "train.checkpoint_interval: must be a multiple of wan.sync_every"),
    ("train.precision=int8", "train.precision"),
    ("model.size=gpt2-125m", "did you mean 'gpt2-124m'"),
    ("data.data_class=secret", "data.data_class"),
    ("train.worker_niceness=-5", "train.worker_niceness: Input should be greater than or "
                                 "equal to 0"),
])
def test_cross_field_errors_name_the_key(override, message):
    extra = ["train.checkpoint_interval=100", "wan.sync_every=7"] \
        if "localsgd" in override else []
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_train_config("", label="c.yaml", overrides=[override, *extra])


def test_unsafe_or_odd_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_train_config(tmp_path / "missing.yaml")
    (tmp_path / "dup.yaml").write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match="duplicate key"):
        load_train_config(tmp_path / "dup.yaml")
    with pytest.raises(ConfigError, match="override 'train.steps': expected key.path=value"):
        parse_train_config("", overrides=["train.steps"])


def test_cli_reports_bad_config_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hybridray", "train", str(ROOT / "configs/train/tiny.yaml"),
         "train.precision=fp8", "model.size=huge"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "model.size: unknown model size 'huge'" in proc.stderr
    assert "train.precision" in proc.stderr and "Traceback" not in proc.stderr


def test_job_script_runs_as_a_plain_script_from_anywhere(tmp_path):
    script = ROOT / "jobs" / "train.py"
    assert script.read_text().startswith("# ray job submit --working-dir . -- python "
                                         "jobs/train.py ")
    ok = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                        text=True, cwd=tmp_path, timeout=60)
    assert ok.returncode == 0 and "key=value" in ok.stdout
    bad = subprocess.run([sys.executable, str(script), str(ROOT / "configs/train/tiny.yaml"),
                          "model.size=huge"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=60)
    assert bad.returncode == 2 and "unknown model size 'huge'" in bad.stderr
