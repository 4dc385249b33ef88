"""The fenced code blocks of README.md and docs/*.md, as the docs tests see them.

Every fenced block says its language. ``bash`` (also ``sh``, ``shell``) and ``python`` blocks
run, in order, per document (``tests/docs/test_docs.py``); other languages (``yaml``,
``text``, ``json``, …) are shown, not run. Two first-line comments change that, and are
visible to the reader:

* ``# not run by the docs tests: REASON`` — the block cannot run on a test machine (it needs
  a cloud account, a GPU, runs until Ctrl-C, …); REASON says why.
* ``# file: PATH`` — the block is a file the reader saves (a module, a config); the tests
  write it to PATH in the document's working directory, and later blocks use it.

A block another test already runs as written (the namespace rehearsal needs root and its own
cluster: ``tests/cluster/test_netns.py``) is not run twice: its marker's reason names that
test, ``tests/PATH.py::TEST`` (``TEST*`` for several), and that module's ``doc_blocks()``
returns the texts it runs. ``covered_by`` reads the reference; ``test_blocks.py`` checks that
the module and tests exist and run exactly the marked blocks, and that every block such a
module runs is marked as run by it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python",
       "python3": "python"}
MARKER = "# not run by the docs tests:"
_MARKER_RE = re.compile(r"^#\s*not run by the docs tests:\s*(.*)$")
_FILE_RE = re.compile(r"^#\s*file:\s*(\S+)\s*$")
_COVERED_RE = re.compile(r"(tests/[\w/]+\.py)::(\w+\*?)")
_FENCE_RE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")

# Reading order: the README, then the guides in the order the README's map sends a reader;
# documents added later run after these, by name.
ORDER = ["README.md", "docs/topology.md", "docs/architecture.md", "docs/data.md",
         "docs/training.md", "docs/serving.md", "docs/operations.md", "docs/deploy.md"]


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text and what the tests do with it."""

    doc: str              # path relative to the repository root
    line: int             # 1-based line of the opening fence
    lang: str             # the info string's first word, lower case ("" when missing)
    text: str             # the content, indentation of the fence removed
    action: str           # "bash" | "python" | "file" | "skip" | "show" | "untagged"
    reason: str = ""      # why it is skipped (the marker's text)
    path: str = ""        # for "file": where it is written

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def covered_by(self) -> tuple[str, str] | None:
        """(test module path, test name or ``prefix*``) when a marked block says which test
        runs it instead."""
        m = _COVERED_RE.search(self.reason) if self.action == "skip" else None
        return (m.group(1), m.group(2)) if m else None

    @property
    def body_line(self) -> int:
        """The document line of the block's first content line."""
        return self.line + 1


def documents(root: Path = ROOT) -> list[str]:
    """README.md and docs/*.md, in reading order."""
    found = ["README.md"] if (root / "README.md").exists() else []
    found += sorted(str(p.relative_to(root)) for p in (root / "docs").glob("*.md"))
    known = [d for d in ORDER if d in found]
    return known + [d for d in found if d not in known]


def blocks(doc: str, root: Path = ROOT) -> list[Block]:
    """Every fenced block of ``doc``, classified."""
    lines = (root / doc).read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m.group("indent"), m.group("fence")
        lang = (m.group("info").split() or [""])[0].lower()
        start, body = i + 1, []
        i += 1
        while i < len(lines):
            close = lines[i].strip()
            if close.startswith(fence[0] * len(fence)) and set(close) == {fence[0]}:
                break
            text = lines[i]
            body.append(text[len(indent):] if text.startswith(indent) else text.lstrip())
            i += 1
        i += 1
        out.append(_classify(doc, start, lang, "\n".join(body) + "\n"))
    return out


def _classify(doc: str, line: int, lang: str, text: str) -> Block:
    first = text.split("\n", 1)[0].strip()
    skip, file = _MARKER_RE.match(first), _FILE_RE.match(first)
    if skip:
        return Block(doc, line, lang, text, "skip", reason=skip.group(1).strip())
    if file:
        return Block(doc, line, lang, text, "file", path=file.group(1))
    if not lang:
        return Block(doc, line, lang, text, "untagged")
    return Block(doc, line, lang, text, RUN.get(lang, "show"))


def problems(blocks_: list[Block]) -> list[str]:
    """What makes a document's blocks unusable by the tests, one line each with the fix."""
    out = []
    for b in blocks_:
        if b.action == "untagged":
            out.append(f"{b.where}: a fenced block without a language; tag it ```bash or "
                       "```python (it runs in the docs tests) or ```text, ```yaml (shown only)")
        elif b.action == "skip" and not b.reason:
            out.append(f"{b.where}: '{MARKER}' needs a reason after the colon")
        elif b.action == "file":
            path = Path(b.path)
            if path.is_absolute() or ".." in path.parts:
                out.append(f"{b.where}: '# file: {b.path}' must be a relative path inside "
                           "the working directory")
        for n, text in enumerate(b.text.splitlines()[1:], start=b.body_line + 1):
            if _MARKER_RE.match(text.strip()):
                out.append(f"{b.doc}:{n}: '{MARKER}' only counts as the block's first line")
    return out
