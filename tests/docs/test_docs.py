"""Docs are tests: every bash and python block of README.md and docs/*.md runs here, in order
per document, on a real local cluster, with the text the reader sees.

One test per document, in reading order (``tests/docs/blocks.py``). Documents share what a
reader's machine shares: one copy of the repository and one ``HYBRIDRAY_HOME`` (so the
cluster a document brings up is still up for the next one that asks for it: ``hybridray up``
of a cluster that already runs from the same file is a no-op). Each document gets a fresh
terminal and Python session (``tests/docs/session.py``). A failing block fails its document
with the block, its place and its output; the blocks after it in that document do not run.
Every cluster the documents leave up is brought down at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.docs.blocks import blocks, documents, problems
from tests.docs.session import DocumentRun, base_env, make_workdir

pytestmark = pytest.mark.slow

DOCS = documents()
VENV = Path(sys.prefix)


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    base = tmp_path_factory.mktemp("docs")
    home = base / "home"
    home.mkdir()
    workdir = make_workdir(base / "repo", VENV)
    env = base_env(home, VENV)
    timings: dict[str, float] = {}
    yield {"base": base, "home": home, "workdir": workdir, "env": env, "timings": timings}
    from hybridray.cluster.state import list_clusters

    for name in list_clusters(home):
        subprocess.run([str(VENV / "bin" / "hybridray"), "down", name], env=env,
                       cwd=workdir, capture_output=True, timeout=300)
    (base / "timings.json").write_text(json.dumps(timings, indent=2))


@pytest.mark.parametrize("doc", DOCS)
def test_document(machine, doc):
    found = blocks(doc)
    assert problems(found) == []
    runnable = [b for b in found if b.action in ("bash", "python", "file")]
    if not runnable:
        pytest.skip(f"{doc} has no block to run")
    run = DocumentRun(doc, machine["workdir"], machine["env"],
                      machine["base"] / "runs" / doc.replace("/", "_"), VENV)
    started = time.monotonic()
    try:
        for block in runnable:
            run.run(block)
    finally:
        run.close()
        machine["timings"][doc] = {"seconds": round(time.monotonic() - started, 1),
                                   "blocks": run.seconds}
