"""docs/deploy.md's render/certs block, followed as written (issue 12: "docs/deploy.md is
followed as written in a test where it can be"): its commands run in a fresh directory, and
what they write is what the page says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.paths import CLUSTERS

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


def doc_blocks() -> list[str]:
    """The blocks of DOC this module runs (the docs tests skip them: tests/docs/blocks.py)."""
    return [re.search(r"```bash\n(.*?)```", DOC.read_text(), re.S).group(1)]


def test_the_first_block_of_deploy_md_runs_as_written(tmp_path):
    block = doc_blocks()[0]
    assert "hybridray certs" in block and "hybridray render" in block
    (tmp_path / "clusters").symlink_to(CLUSTERS)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "hybridray").write_text(f"#!/bin/sh\nexec {sys.executable} -m hybridray \"$@\"\n")
    (bindir / "hybridray").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
           "HYBRIDRAY_HOME": str(tmp_path / "home")}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# Deploying `onprem-aws`" in proc.stdout
    secrets, out = tmp_path / "secrets", tmp_path / "build" / "onprem-aws"
    assert {p.name for p in (secrets / "sites").iterdir()} == {"onprem", "aws"}
    assert (secrets / "trust.pem").is_file() and len(list((secrets / "nodes").glob("*.crt"))) == 7
    config = yaml.safe_load((out / "aws" / "ray-up.yaml").read_text())
    assert config["available_node_types"]["h100"]["node_config"]["SubnetIds"] == \
        ["subnet-0a1b2c3d4e5f60718"]
    assert (out / "onprem" / "join-cpu-0.sh").is_file()
    assert "10.20.0.21" in subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
         str(secrets / "nodes" / "cpu-01.dc2.example.internal.crt")],
        capture_output=True, text=True).stdout
