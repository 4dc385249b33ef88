"""Process identity on Linux, from ``/proc``: start times, groups, descendants, reaping.

A pid alone names a process only until the kernel recycles it, so whatever hybridray starts
(cluster nodes, the S3 server, a sync's lease holder) is recorded as pid *and* start time
(``/proc/PID/stat`` field 22), and is only ever "ours" while both match.
"""

from __future__ import annotations

import contextlib
import os


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` split after the command name (which may hold spaces and ')')."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """Start time of a live (non-zombie) process in clock ticks since boot, else None."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of the file; fields[0] is field 3 (state)


def _live_processes():
    """``(pid, stat fields)`` of every live, non-zombie process."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[0] not in ("Z", "X"):
            yield int(entry.name), fields


def group_members(pgid: int, not_before: int = 0) -> list[int]:
    """Live pids in process group ``pgid`` started at or after ``not_before`` (clock ticks)."""
    return [pid for pid, fields in _live_processes()
            if int(fields[2]) == pgid and int(fields[19]) >= not_before]


def descendants(pids: list[int]) -> dict[int, int]:
    """Every live process below ``pids`` in the process tree: ``{pid: start time}``.

    Some children leave their node's process group (Serve's HAProxy starts a session of its
    own), so stopping a node by group would orphan them; the tree still finds them while the
    node runs.
    """
    children: dict[int, list[tuple[int, int]]] = {}
    for pid, fields in _live_processes():
        children.setdefault(int(fields[1]), []).append((pid, int(fields[19])))
    found: dict[int, int] = {}
    todo = list(pids)
    while todo:
        for pid, started in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def processes_using(text: str) -> list[int]:
    """Live pids whose command line contains ``text`` (e.g. a Ray temp dir)."""
    needle = text.encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if needle in f.read().replace(b"\0", b" "):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is our own child, so it leaves no zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
