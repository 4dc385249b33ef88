"""Run a document's blocks the way a reader does: one terminal and one Python session per
document, on a machine whose hybridray home (and cluster) persists between documents.

* bash blocks run one after another, each as ``bash`` with ``set -e -o pipefail``; what a
  block exports and the directory it ends in carry over to the next block (``. activate``,
  ``eval "$(hybridray env local)"``, ``export TOKEN=…``, ``cd``), as in one terminal;
* python blocks run in one interpreter per document, started (at its first python block)
  with the environment the bash blocks had built so far, in one namespace;
* ``# file: PATH`` blocks are written to PATH; ``# not run by the docs tests:`` blocks are not.

Every run starts with the venv's ``bin`` first on PATH and a private ``HYBRIDRAY_HOME``, in a
copy of the repository (commands write files: reports, rendered configs, ``mymodel.py``).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

from tests.docs.blocks import MARKER, ROOT, Block

BLOCK_TIMEOUT_S = 900
OUTPUT_LINES = 60
# What a pytest process (or the developer's shell) may have exported: a reader's fresh
# terminal has none of it.
FOREIGN = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
           "RAY_API_SERVER_ADDRESS", "RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY",
           "RAY_TLS_CA_CERT", "HYBRIDRAY_CLUSTER", "HYBRIDRAY_SERVE_TOKENS", "VIRTUAL_ENV",
           "PYTHONPATH", "HYBRIDRAY_WAIT_TIMEOUT_S")
_DROP = {"PWD", "OLDPWD", "SHLVL", "_", "BASH_ENV", "ENV"}


class BlockFailed(AssertionError):
    pass


def make_workdir(dest: Path, venv: Path) -> Path:
    """A copy of the repository's files as a fresh clone has them, with ``.venv`` leading
    to the venv the tests run in (``make setup`` is then a no-op, as after a first run)."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                 and not {".git", ".venv", "__pycache__"} & set(p.relative_to(ROOT).parts)]
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    # A real .venv directory (Ray's job packaging skips it: .gitignore) whose parts lead to
    # the test venv, so `. .venv/bin/activate` and `make setup` behave as in the checkout.
    (dest / ".venv").mkdir(exist_ok=True)
    for part in ("bin", "lib", "lib64", "include", "pyvenv.cfg", "share"):
        if (venv / part).exists() and not (dest / ".venv" / part).exists():
            (dest / ".venv" / part).symlink_to(venv / part)
    (dest / ".venv" / ".installed").touch()
    return dest


def base_env(home: Path, venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN
           and not k.startswith(("PYTEST_", "COV_"))}
    env.update(HYBRIDRAY_HOME=str(home), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", TERM="dumb",
               COLUMNS="160")
    return env


class DocumentRun:
    """One document's terminal and Python session."""

    def __init__(self, doc: str, workdir: Path, env: dict[str, str], scratch: Path,
                 venv: Path):
        self.doc, self.workdir, self.venv = doc, workdir, venv
        self.scratch = scratch
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.env = dict(env)
        self.cwd = workdir
        self.python: subprocess.Popen | None = None
        self.python_log = scratch / "python.log"
        self.done: list[str] = []
        self.sessions: list[int] = []       # each bash block's session: what it left running
        self.seconds: dict[str, float] = {}   # per block, for the suite's time budget

    # -- running ------------------------------------------------------------------------
    def run(self, block: Block) -> None:
        started = time.monotonic()
        try:
            self._run(block)
        finally:
            self.seconds[block.where] = round(time.monotonic() - started, 1)

    def _run(self, block: Block) -> None:
        if block.action == "bash":
            self._bash(block)
        elif block.action == "python":
            self._python(block)
        elif block.action == "file":
            target = self.cwd / block.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text.split("\n", 1)[1] if "\n" in block.text else "")
        self.done.append(block.where)

    def _bash(self, block: Block) -> None:
        n = len(self.done)
        script, state = self.scratch / f"block-{n}.sh", self.scratch / f"state-{n}"
        offset = block.body_line - 4          # the script's line 4 is the block's first line
        script.write_text(
            "set -e -o pipefail\n"
            f"trap '[ $? -eq 0 ] && {{ export -p > {state}.env; pwd > {state}.cwd; }}' EXIT\n"
            f"trap 'echo \"[docs tests] {block.doc}:$((LINENO + {offset})): exit status $? "
            "from: $BASH_COMMAND\" >&2' ERR\n"
            + block.text)
        # The block's output goes to files, not pipes: a process it leaves in the background
        # (`ray start --block ... &`) must not hold the runner until it exits.
        out_path = self.scratch / f"block-{n}.out"
        with open(out_path, "w") as out:
            proc = subprocess.Popen(["bash", "--noprofile", "--norc", str(script)],
                                    cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            self.sessions.append(proc.pid)
            try:
                proc.wait(timeout=BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _end_session(proc.pid)
                proc.wait(timeout=30)
                self._fail(block, f"did not finish within {BLOCK_TIMEOUT_S} s",
                           out_path.read_text(errors="replace"))
        output = out_path.read_text(errors="replace")
        if proc.returncode != 0:
            self._fail(block, f"exited with status {proc.returncode}", output)
        self.env = _read_exports(Path(f"{state}.env"), self.env)
        self.cwd = Path(Path(f"{state}.cwd").read_text().strip())

    def _python(self, block: Block) -> None:
        if self.python is None or self.python.poll() is not None:
            self.python = subprocess.Popen(
                [str(self.venv / "bin" / "python"), str(Path(__file__).with_name(
                    "pyserver.py")), str(self.python_log)], cwd=self.cwd, env=self.env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, start_new_session=True)
        start = self.python_log.stat().st_size if self.python_log.exists() else 0
        request = {"code": block.text, "filename": str(ROOT / block.doc),
                   "line": block.body_line}
        self.python.stdin.write(json.dumps(request) + "\n")
        self.python.stdin.flush()
        ready, _, _ = select.select([self.python.stdout], [], [], BLOCK_TIMEOUT_S)
        answer = self.python.stdout.readline() if ready else ""
        output = self._python_output(start)
        if not answer:
            self._kill_python()
            self._fail(block, "the Python session died" if ready else
                       f"did not finish within {BLOCK_TIMEOUT_S} s", output)
        reply = json.loads(answer)
        if not reply["ok"]:
            self._fail(block, "raised", output + reply["error"])

    def _python_output(self, start: int) -> str:
        if not self.python_log.exists():
            return ""
        with open(self.python_log, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            return f.read()

    # -- ending -------------------------------------------------------------------------
    def close(self) -> None:
        # What the document's blocks left running in their sessions (a reader closing the
        # terminal): stopped by session id, so only processes these blocks started.
        for sid in self.sessions:
            _end_session(sid)
        if self.python is not None and self.python.poll() is None:
            self.python.stdin.close()
            try:
                self.python.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill_python()

    def _kill_python(self) -> None:
        if self.python is not None and self.python.poll() is None:
            try:
                os.killpg(self.python.pid, signal.SIGKILL)   # its own session: only ours
            except ProcessLookupError:
                pass
            self.python.wait(timeout=30)

    def _fail(self, block: Block, what: str, output: str) -> None:
        lines = output.rstrip().splitlines()
        shown = "\n".join(lines[-OUTPUT_LINES:])
        cut = f"(last {OUTPUT_LINES} of {len(lines)} lines)" if len(lines) > OUTPUT_LINES \
            else ""
        raise BlockFailed(
            f"{block.where}: this {block.lang} block {what}:\n"
            f"{textwrap.indent(block.text.rstrip(), '    ')}\n"
            f"--- its output {cut}---\n{shown}\n---\n"
            f"A block that cannot run on a test machine says so in its first line:\n"
            f"    {MARKER} REASON")


def _session_pids(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (/proc/PID/stat, field 6)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _end_session(sid: int, grace_s: float = 15.0) -> None:
    """SIGTERM every process of session ``sid``, then SIGKILL what is left after grace_s."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _session_pids(sid):
            time.sleep(0.2)


def _read_exports(path: Path, old: dict[str, str]) -> dict[str, str]:
    """The environment ``export -p`` wrote, read by bash itself (quoting is bash's)."""
    if not path.exists():
        return old
    dump = subprocess.run(["bash", "--noprofile", "--norc", "-c",
                           f"source {path} 2>/dev/null; env -0"], env={}, capture_output=True,
                          check=False)
    env = {}
    for item in dump.stdout.split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode(errors="replace").partition("=")
            if key not in _DROP:
                env[key] = value
    return env or old

