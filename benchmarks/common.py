"""What every benchmark prints around its numbers, and how it counts a side's CPU and memory.

A figure in ``RESULTS.md`` is a table a script printed, pasted as it came: so every table is
preceded by the same block (``header``): the exact command, the commit, the machine, when,
and the load average before and after (this is a shared 2-core machine; the load says how
much else ran). ``repeats_table`` prints every repeat, the median and the spread (min-max);
a ratio is always ``paired``: the median of per-repeat ratios of runs taken side by side
(interleaved), never a ratio of two medians of unpaired runs. ``ProcessTree`` counts CPU
seconds and memory of every process of a side (a Ray cluster's daemons and workers
included), not just the one that does the work. ``tests/test_benchmarks.py`` checks that
each table in RESULTS.md names a command these scripts accept.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the block above every table ----------------------------------------------------------

def command_line(script: str, argv: Sequence[str] | None) -> str:
    """``python benchmarks/NAME.py ARGS`` as the user typed it (argv without the script)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *args])


def commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    parts = [f"{platform.machine()}, {os.cpu_count()} CPUs, {mem:.0f} GiB",
             f"{platform.system()} {platform.release()}", f"Python {platform.python_version()}"]
    for name in ("ray", "torch"):
        try:
            from importlib.metadata import version

            parts.append(f"{name} {version(name)}")
        except Exception:
            pass
    return ", ".join(parts)


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


class Section:
    """One table's worth of measuring: load before at creation, after at ``header()``."""

    def __init__(self, script: str, argv: Sequence[str] | None = None):
        self.command = command_line(script, argv)
        self.load_before = load()
        self.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def header(self, what: str) -> str:
        return (f"Command: `{self.command}`\n\n"
                f"{what}. Commit {commit()}; {machine()}; started {self.started}; load "
                f"average (1/5/15 min) before {self.load_before}, after {load()}.\n")


# ---- repeats, medians, spreads, paired ratios ----------------------------------------------

def median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def spread(values: Iterable[float], fmt: str = "{:.3g}") -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def paired(ours: Sequence[float], theirs: Sequence[float]) -> list[float]:
    """Per-repeat ratios ``ours[i] / theirs[i]`` of runs taken side by side."""
    return [a / b if b else float("nan") for a, b in zip(ours, theirs, strict=True)]


def repeats_table(rows: list[tuple[str, Sequence[float], str]], first: str = "measure") -> str:
    """A table with one column per repeat, then the median and the spread (min-max).

    ``rows``: (label, one value per repeat, format such as ``"{:,.0f}"``).
    """
    n = max(len(values) for _, values, _ in rows)
    lines = [f"| {first} | " + " | ".join(f"#{i + 1}" for i in range(n))
             + " | median | spread (min–max) |",
             "|---|" + "---:|" * n + "---:|---:|"]
    for label, values, fmt in rows:
        cells = [fmt.format(v) if v == v else "-" for v in values] + [""] * (n - len(values))
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {fmt.format(median(values))} | {spread(values, fmt)} |")
    return "\n".join(lines)


def verdict(value: float, target: float, *, at_least: bool = True) -> str:
    ok = value >= target if at_least else value <= target
    return "met" if ok else "MISSED"


# ---- every process of a side ----------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("latin-1")
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                out.setdefault(int(fields[1]), []).append(int(entry))
    return out


def tree(roots: Iterable[int]) -> list[int]:
    """``roots`` and every process below them."""
    kids = _children()
    seen: list[int] = []
    todo = [r for r in roots if os.path.exists(f"/proc/{r}")]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(kids.get(pid, []))
    return seen


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of each process and of its waited-for children (cutime + cstime).

    Taken over a whole tree before and after, the difference counts every process that ran
    in between: one that exited was reaped by its parent (in the tree), whose cutime grew.
    """
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            total += sum(int(x) for x in fields[11:15])   # utime stime cutime cstime
    return total / CLK_TCK


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (Ray's object store, libraries) counted once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


CPUACCT = Path("/sys/fs/cgroup/cpuacct")


class CpuGroup:
    """A cpuacct cgroup: the exact CPU time of every process put in it and of everything
    they start later (children inherit the group), exited processes included.

    Ray's raylet ignores SIGCHLD, so the kernel reaps its exited workers without adding their
    CPU to its own: summing /proc over a tree misses every worker that finished. A cgroup
    does not. ``None`` from ``create`` when the machine offers no writable cpuacct hierarchy.
    """

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, name: str) -> CpuGroup | None:
        path = CPUACCT / f"hybridray-bench-{os.getpid()}-{name}"
        try:
            path.mkdir(exist_ok=True)
            (path / "cpuacct.usage").read_text()
        except OSError:
            return None
        return cls(path)

    def adopt(self, pids: Iterable[int]) -> None:
        for pid in pids:
            try:
                (self.path / "cgroup.procs").write_text(str(pid))
            except OSError:     # exited meanwhile
                pass

    def enter(self) -> None:
        """Put the calling process in the group (a subprocess's ``preexec_fn``)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def seconds(self) -> float:
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        """Move whatever is left back to the root group, then delete the group."""
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (CPUACCT / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            self.path.rmdir()
        except OSError:
            pass


CPU_CONTROLLER = Path("/sys/fs/cgroup/cpu")


class CpuBudget(CpuGroup):
    """A cgroup of the ``cpu`` controller with a CFS quota: every process put in it, and
    everything they start later, together get at most ``cpus`` CPUs of time. Two sides of a
    comparison each in a budget of the same size have the same CPU to spend, however many
    processes each runs. ``None`` from ``create`` when the machine offers no writable
    ``cpu`` hierarchy (then the sides share the machine, and the table says so)."""

    @classmethod
    def create(cls, name: str, cpus: float = 1.0) -> CpuBudget | None:   # type: ignore[override]
        path = CPU_CONTROLLER / f"hybridray-bench-{os.getpid()}-{name}"
        try:
            path.mkdir(exist_ok=True)
            period = int((path / "cpu.cfs_period_us").read_text())
            (path / "cpu.cfs_quota_us").write_text(str(int(period * cpus)))
        except OSError:
            return None
        budget = cls(path)
        budget.cpus = cpus
        return budget

    def seconds(self) -> float:
        raise NotImplementedError("a CpuBudget limits; a CpuGroup (cpuacct) counts")

    def throttled_s(self) -> float:
        """Seconds the group was held back by its quota so far."""
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "throttled_time":
                return int(value) / 1e9
        return 0.0

    def remove(self) -> None:
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (CPU_CONTROLLER / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            self.path.rmdir()
        except OSError:
            pass


class ProcessTree:
    """CPU seconds and peak memory (sum of PSS) of a side: every process below ``roots``.

    ``roots`` is a callable (a side's processes may start inside the measured interval).
    CPU comes from ``group`` (a ``CpuGroup`` holding the side's processes) when given, else
    from /proc: utime + stime of each process as last seen by the sampler (a process that
    exits between two samples loses at most ``interval`` of CPU). ``own`` adds this
    process's own CPU (a driver) and memory. Memory is sampled every ``interval`` seconds:
    reading PSS walks page tables, so sampling often would itself cost the side CPU (a
    quarter-second interval was measured at about a quarter of a core with Ray's processes).
    """

    def __init__(self, roots: Callable[[], Iterable[int]], *, group: CpuGroup | None = None,
                 own: bool = False, interval: float = 2.0):
        self.roots, self.group, self.own, self.interval = roots, group, own, interval
        self.peak_bytes = 0
        self.cpu_s = 0.0
        self._seen: dict[tuple[int, int], list[float]] = {}   # (pid, start) -> [first, last]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _pids(self) -> list[int]:
        return [p for p in tree(self.roots()) if p != os.getpid()]

    def _look(self, first: bool = False) -> None:
        total = 0
        for pid in self._pids():
            fields = _stat(pid)
            if not fields:
                continue
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK     # utime + stime
            key = (pid, int(fields[19]))                             # pid + start time
            if key in self._seen:
                self._seen[key][1] = cpu
            else:
                self._seen[key] = [cpu if first else 0.0, cpu]
            total += pss_bytes(pid)
        if self.own:
            total += pss_bytes(os.getpid())
        self.peak_bytes = max(self.peak_bytes, total)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._look()

    def start(self) -> ProcessTree:
        self._look(first=True)
        self._cpu0 = self.group.seconds() if self.group else 0.0
        self._own0 = _own_cpu()
        self._thread.start()
        return self

    def stop(self) -> ProcessTree:
        self._stop.set()
        self._thread.join()
        self._look()
        if self.group:
            self.cpu_s = self.group.seconds() - self._cpu0
        else:
            self.cpu_s = sum(last - first for first, last in self._seen.values())
        if self.own:
            self.cpu_s += _own_cpu() - self._own0
        return self


def _own_cpu() -> float:
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime
