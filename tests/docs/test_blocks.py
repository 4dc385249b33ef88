"""Every fenced block of README.md and docs/*.md is one the docs tests know what to do with:
it runs (bash, python), is a file the reader saves (``# file: PATH``), is only shown (yaml,
text, …), or says in its first line why it cannot run here. No Ray needed."""

from __future__ import annotations

import pytest

from tests.docs.blocks import Block, _classify, blocks, documents, problems

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
