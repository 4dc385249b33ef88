"""Every fenced block of README.md and docs/*.md is one the docs tests know what to do with:
it runs (bash, python), is a file the reader saves (``# file: PATH``), is only shown (yaml,
text, …), or says in its first line why it cannot run here. No Ray needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.blocks import ROOT, Block, _classify, blocks, documents, problems

DOCS = documents()


def test_the_documents_are_found_in_reading_order():
    assert DOCS[0] == "README.md"
    assert {"docs/data.md", "docs/training.md", "docs/serving.md"} <= set(DOCS)


@pytest.mark.parametrize("doc", DOCS)
def test_every_block_is_runnable_shown_or_marked(doc):
    found = blocks(doc)
    assert problems(found) == []
    for b in found:
        assert b.action in ("bash", "python", "file", "skip", "show"), b.where


def test_the_marker_and_file_comments_are_read_from_the_first_line_only():
    skip = _classify("x.md", 3, "bash", "# not run by the docs tests: needs AWS\naws s3 ls\n")
    assert (skip.action, skip.reason) == ("skip", "needs AWS")
    assert _classify("x.md", 3, "yaml", "# file: own.yaml\nname: x\n").path == "own.yaml"
    late = Block("x.md", 3, "bash", "ls\n# not run by the docs tests: late\n", "bash")
    assert problems([late]) == ["x.md:5: '# not run by the docs tests:' only counts as the "
                                "block's first line"]
    assert problems([_classify("x.md", 1, "bash", "# not run by the docs tests:\nls\n")])
    assert problems([_classify("x.md", 1, "", "ls\n")])[0].startswith("x.md:1: a fenced "
                                                                      "block without")


def _doc_readers() -> dict[str, object]:
    """Every test module outside tests/docs that runs doc blocks itself (``doc_blocks()``)."""
    import importlib

    found = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("tests/docs/") or "def doc_blocks(" not in path.read_text():
            continue
        found[rel] = importlib.import_module(rel[:-3].replace("/", "."))
    return found


def _same(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def test_blocks_run_by_another_test_are_exactly_the_ones_it_runs():
    """A block marked as run by ``tests/X.py::TEST`` is one of the blocks that module runs
    (its ``doc_blocks()``), and TEST exists there; every block such a module runs is marked
    so in its document. Nothing is run twice, and nothing is left to no test."""
    readers = _doc_readers()
    assert "tests/cluster/test_netns.py" in readers        # the namespace rehearsal
    assert "tests/deploy/test_deploy_doc.py" in readers    # render/certs
    marked: dict[str, list] = {}
    for doc in DOCS:
        for b in blocks(doc):
            if b.covered_by is None:
                continue
            module, test = b.covered_by
            assert module in readers, f"{b.where}: {module} has no doc_blocks()"
            names = [n for n in dir(readers[module]) if n.startswith("test_")]
            assert (test.rstrip("*") in names if not test.endswith("*")
                    else any(n.startswith(test[:-1]) for n in names)), \
                f"{b.where}: {module} has no test {test}"
            assert Path(readers[module].DOC).resolve() == (ROOT / doc).resolve(), b.where
            assert any(_same(b.text, t) for t in readers[module].doc_blocks()), \
                f"{b.where}: {module} does not run this block (its text differs)"
            marked.setdefault(module, []).append(b)
    for module, reader in readers.items():
        for text in reader.doc_blocks():
            assert any(_same(b.text, text) for b in marked.get(module, [])), \
                f"{module} runs a block its document does not mark as run by it:\n{text}"


def test_covered_by_reads_the_test_named_in_the_marker():
    b = _classify("x.md", 3, "bash", "# not run by the docs tests: needs root; run by "
                  "tests/cluster/test_netns.py::test_the_doc_* in order\nhybridray up\n")
    assert b.covered_by == ("tests/cluster/test_netns.py", "test_the_doc_*")
    assert _classify("x.md", 3, "bash", "# not run by the docs tests: needs AWS\nls\n"
                     ).covered_by is None
