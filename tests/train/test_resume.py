"""Resume is explicit, on the shared cluster: re-running a run's name never silently turns a
documented command into a no-op or into a run with other settings.

One real 4-step run writes a checkpoint; the rest are decisions (``--dry-run`` plans, which
refuse exactly as a real run would, before any worker starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hybridray.exceptions import TrainError
from hybridray.train.trainer import train
from tests.paths import ROOT

pytestmark = pytest.mark.slow

FAST = ["model.block_size=32", "train.micro_batch=8", "train.eval_batches=2",
        "train.warmup_steps=1", "train.max_failures=0", "data.max_files=12",
        "data.shard_files=6", "data.output=onprem:datasets/test-resume",
        "train.log_interval=2", "train.eval_interval=4", "train.checkpoint_interval=4"]


@pytest.fixture(scope="module")
def four_steps(hr_cluster):
    result = train({"name": "resumable"}, hr_cluster, overrides=[*FAST, "train.steps=4"],
                   progress=False)
    assert result.checkpoint == "onprem:checkpoints/resumable/checkpoint-00000004"
    return result


def dry_run(local_cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hybridray", "train", "configs/train/tiny.yaml",
         "name=resumable", *FAST, "--dry-run", "--cluster", local_cluster.name, *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, **_env(local_cluster)})


def _env(state):
    from hybridray.cluster import ray_env

    return ray_env(state)


def test_a_run_already_at_its_steps_is_refused_with_the_choices(hr_cluster, four_steps):
    with pytest.raises(TrainError) as e:
        train({"name": "resumable"}, hr_cluster, overrides=[*FAST, "train.steps=4"],
              progress=False)
    text = str(e.value)
    assert "already has a checkpoint at step 4" in text and "train.steps=4" in text
    assert "would train nothing" in text
    assert "--new-run" in text and "name=OTHER" in text and "--resume" in text


def test_other_wan_mode_or_precision_is_refused_unless_resume_is_asked(local_cluster,
                                                                      four_steps):
    proc = dry_run(local_cluster, "train.steps=8", "--wan", "powersgd")
    assert proc.returncode == 2 and proc.stdout == ""
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    err = errors[0]
    assert "trained with other settings" in err and "WAN mode fp32 → powersgd" in err
    assert "--resume (continue it from step 4" in err and "--new-run" in err

    proc = dry_run(local_cluster, "train.steps=8", "train.precision=bf16")
    assert proc.returncode == 2 and "precision fp32 → bf16" in proc.stderr

    proc = dry_run(local_cluster, "train.steps=8", "--wan", "powersgd", "--resume")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["run"] == "resumable" and out["resume_step"] == 4

    proc = dry_run(local_cluster, "train.steps=4", "--resume")   # nothing left to train
    assert proc.returncode == 2 and "train.steps above 4" in proc.stderr

    proc = dry_run(local_cluster, "train.steps=4", "--wan", "powersgd", "--new-run")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["run"].startswith("resumable-") and out["resume_step"] is None


def test_the_same_settings_with_more_steps_resume_without_asking(local_cluster, four_steps):
    proc = dry_run(local_cluster, "train.steps=8")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resume_step"] == 4
