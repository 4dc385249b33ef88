"""Every table in benchmarks/RESULTS.md names a command that exists.

RESULTS.md holds the tables the benchmark scripts print, pasted as they came; each is
preceded by the script's ``Command: `python benchmarks/NAME.py ARGS``` line. A table whose
command is gone, or whose arguments the script no longer accepts, is a figure nobody can
reproduce. (Timings are not checked here: speed lives in the benchmarks themselves.)
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys

import pytest

from tests.paths import ROOT

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
COMMAND = re.compile(r"^Command: `(?P<cmd>[^`]+)`")


def tables() -> list[tuple[int, str | None]]:
    """(line number of each table's first row, the nearest command line above it)."""
    out, command, inside = [], None, False
    for number, line in enumerate(RESULTS.read_text().splitlines(), 1):
        match = COMMAND.match(line)
        if match:
            command = match["cmd"]
        if line.startswith("|") and not inside:
            out.append((number, command))
        inside = line.startswith("|")
    return out


def _parser(script: str):
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module.parser()


def test_results_md_has_tables():
    assert tables(), "RESULTS.md holds no table"


@pytest.mark.parametrize(("line", "command"), tables(), ids=lambda x: str(x))
def test_each_table_names_a_command_its_script_accepts(line, command):
    assert command is not None, f"RESULTS.md:{line}: a table with no Command: line above it"
    words = shlex.split(command)
    assert words[0] == "python" and words[1].startswith("benchmarks/"), (line, command)
    assert (ROOT / words[1]).is_file(), f"RESULTS.md:{line}: {words[1]} does not exist"
    try:
        _parser(words[1]).parse_args(words[2:])
    except SystemExit:
        pytest.fail(f"RESULTS.md:{line}: {words[1]} does not accept {words[2:]}")
