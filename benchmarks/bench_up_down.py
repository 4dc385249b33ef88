"""How long ``hybridray up``/``down`` of clusters/local.yaml take, against plain ``ray start``.

    python benchmarks/bench_up_down.py            # 3 repetitions of each, interleaved
    python benchmarks/bench_up_down.py -n 5

``up`` is timed until every node is registered alive in the GCS (``hybridray.cluster.up``
returns only then), ``down`` until every recorded process is gone. The plain alternative is
what one would type by hand: ``ray start --head`` then three ``ray start --address``, one after
another (each returns once its node has registered), and ``ray stop`` with its default grace
period (16 s) done exactly as ``ray stop`` does it, restricted to those processes (``ray
stop`` itself would stop every Ray process on the machine): three buckets in order (raylets;
every other process; the GCS), each sent SIGTERM, waited for up to a third of the grace
period (returning as soon as all are gone, as ``psutil.wait_procs`` does), then SIGKILL.
The plain nodes get free ports too, or they would collide with any other cluster on the
machine, and one shared auth token (Ray 2.60's head requires one of every node), but no
labels and no per-node isolation. Runs alternate between the two so that
both see the same machine load. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import Section, paired, repeats_table, tree  # noqa: E402

from hybridray.cluster import down, up  # noqa: E402
from hybridray.cluster.ports import free_ports  # noqa: E402
from hybridray.cluster.state import group_members, process_start_time  # noqa: E402
from hybridray.topology import load_topology  # noqa: E402

LOCAL_YAML = ROOT / "clusters" / "local.yaml"
RAY = str(Path(sys.executable).parent / "ray")


def bench_hybridray(home: Path) -> tuple[float, float]:
    topology = load_topology(LOCAL_YAML, ["name=bench"])
    t0 = time.perf_counter()
    state = up(topology, source_file=LOCAL_YAML, overrides=["name=bench"], home=home,
               timeout=300)  # a busy machine is slow, not broken
    t_up = time.perf_counter() - t0
    t0 = time.perf_counter()
    down(state.name, home=home)
    t_down = time.perf_counter() - t0
    assert not any(n.alive() for n in state.nodes)
    return t_up, t_down


def bench_plain(tmp: Path) -> tuple[float, float]:
    temp_dir = f"/tmp/hr-{os.getuid()}-plain-{os.getpid()}"  # two benchmarks never share it
    shutil.rmtree(temp_dir, ignore_errors=True)
    gcs, dash, client = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray 2.60's `ray start --head` turns token auth on: a user joining nodes by hand shares
    # one token with every `ray start` (as `hybridray up` does), here from a file of its own
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    common = ["--disable-usage-stats", "--temp-dir", temp_dir, "--object-store-memory",
              str(100 * 2**20)]
    commands = [[RAY, "start", "--head", "--port", str(gcs), "--num-cpus", "0",
                 "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
                 *common]]
    commands += [[RAY, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "2",
                  *common]] * 3
    groups: list[tuple[int, int]] = []  # (pgid, start time): what a ray stop by pid needs
    t0 = time.perf_counter()
    try:
        for i, cmd in enumerate(commands):
            log = tmp / f"plain-{i}.log"  # a file, not a pipe: Ray's daemons inherit it
            with open(log, "wb") as out:
                proc = subprocess.Popen(cmd, env=env, start_new_session=True, cwd=tmp,
                                        stdout=out, stderr=subprocess.STDOUT)
            groups.append((proc.pid, process_start_time(proc.pid) or 0))
            if proc.wait(timeout=120) != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read_text()[-2000:]}")
        t_up = time.perf_counter() - t0
    finally:
        t0 = time.perf_counter()
        ray_stop(groups)
        t_down = time.perf_counter() - t0
        shutil.rmtree(temp_dir, ignore_errors=True)
    return t_up, t_down


RAY_STOP_GRACE_S = 16   # ray stop --grace-period default (Ray 2.60)


def ray_stop(groups: list[tuple[int, int]], grace: float = RAY_STOP_GRACE_S) -> None:
    """What ``ray stop`` does, for the processes of ``groups`` (process group id, start time
    of its leader: ``ray start`` exits once its daemons run, and they stay in its group):
    SIGTERM the raylets, then the other daemons, then the GCS, each batch given a third of
    the grace period (returning as soon as all of it is gone, as ``psutil.wait_procs``
    does), then SIGKILL. Processes are told apart by pid and start time (``/proc``)."""
    members = [pid for pgid, start in groups for pid in group_members(pgid, start)]
    started = {pid: process_start_time(pid) for pid in tree(members)}

    def alive(pid: int) -> bool:
        return started[pid] is not None and process_start_time(pid) == started[pid]

    def bucket(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return 1
        return 0 if "raylet" in name.split(" ")[0] else 2 if "gcs_server" in name else 1

    def signal_all(pids: list[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def wait_gone(pids: list[int], timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            left = [pid for pid in pids if alive(pid)]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    for which in (0, 1, 2):
        todo = [pid for pid in started if alive(pid) and bucket(pid) == which]
        signal_all(todo, signal.SIGTERM)
        left = wait_gone(todo, grace / 3)
        signal_all(left, signal.SIGKILL)
        wait_gone(left, 2)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=3, help="repetitions of each (default 3)")
    p.add_argument("--json", action="store_true", help="also print raw timings as JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    section = Section(__file__, argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so no cluster is left behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    runs: dict[str, list[tuple[float, float]]] = {"hybridray": [], "plain": []}
    failed: dict[str, list[str]] = {"hybridray": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="hr-bench-") as tmp:
        for i in range(args.n):
            for name, fn in (("plain", lambda: bench_plain(Path(tmp))),
                             ("hybridray", lambda: bench_hybridray(Path(tmp) / "home"))):
                try:
                    runs[name].append(fn())
                except Exception as e:  # a failed start is a result too; both clean up
                    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                    why = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
                    failed[name].append(why)
                    print(f"run {i + 1}/{args.n} {name:<9} FAILED: {failed[name][-1]}",
                          file=sys.stderr, flush=True)
                    continue
                t_up, t_down = runs[name][-1]
                print(f"run {i + 1}/{args.n} {name:<9} up {t_up:6.2f}s  down {t_down:5.2f}s",
                      file=sys.stderr, flush=True)

    rows = []
    for label, which in (("up: all 4 nodes registered in the GCS (s)", 0),
                         ("down: every node process gone (s)", 1)):
        h = [r[which] for r in runs["hybridray"]]
        p = [r[which] for r in runs["plain"]]
        rows += [(f"{label}: plain", p, "{:.2f}"), (f"{label}: hybridray", h, "{:.2f}")]
        if len(h) == len(p):
            rows.append((f"**{label}: ratio hybridray / plain** (paired)", paired(h, p),
                         "{:.2f}"))
    print(section.header(
        f"clusters/local.yaml = head + 3 nodes (3 sites), {args.n} interleaved repeats; "
        f"runs that came up: hybridray {len(runs['hybridray'])} of {args.n}, plain "
        f"{len(runs['plain'])} of {args.n}; plain down = ray stop's algorithm, default "
        f"grace {RAY_STOP_GRACE_S} s"))
    print(repeats_table(rows, "step (per repeat)"))
    for name, errors in failed.items():
        for error in errors:
            print(f"\n{name} run failed: {error}")
    if args.json:
        print(json.dumps({"runs": runs, "failed": failed}))


if __name__ == "__main__":
    main()
