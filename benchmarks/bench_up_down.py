"""How long ``hybridray up``/``down`` of clusters/local.yaml take, against plain ``ray start``.

    python benchmarks/bench_up_down.py            # 3 repetitions of each, interleaved
    python benchmarks/bench_up_down.py -n 5

``up`` is timed until every node is registered alive in the GCS (``hybridray.cluster.up``
returns only then), ``down`` until every recorded process is gone. The plain alternative is
what one would type by hand: ``ray start --head`` then three ``ray start --address``, one after
another (each returns once its node has registered), and a ``ray stop`` equivalent that
signals only those processes (by process group; ``ray stop`` itself would stop every Ray
process on the machine). The plain nodes get free ports too, or they would collide with any
other cluster on the machine, but no labels, no token and no per-node isolation. Runs alternate
between the two so that both see the same machine load. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
        for pgid, _ in groups:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while any(group_members(p, s) for p, s in groups) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pgid, start in groups:
            if group_members(pgid, start):
                os.killpg(pgid, signal.SIGKILL)
        t_down = time.perf_counter() - t0
        shutil.rmtree(temp_dir, ignore_errors=True)
    return t_up, t_down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3, help="repetitions of each (default 3)")
    parser.add_argument("--json", action="store_true", help="also print raw timings as JSON")
    args = parser.parse_args()
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

    def stats(name: str, which: int) -> tuple[float, float]:
        values = [r[which] for r in runs[name]] or [float("nan")]
        return statistics.median(values), min(values)

    import ray

    load = os.getloadavg()
    print(f"\n`python benchmarks/bench_up_down.py -n {args.n}` on {os.cpu_count()} cores, "
          f"{platform.system()}, Python {platform.python_version()}, Ray {ray.__version__}, "
          f"load average at end {load[0]:.2f}/{load[1]:.2f}; clusters/local.yaml = head + 3 "
          "nodes (3 sites). Times in seconds.\n")
    print("| step | hybridray (median / min) | plain `ray start` (median / min) "
          "| ratio of medians |")
    print("|---|---|---|---|")
    print(f"| runs that came up | {len(runs['hybridray'])} of {args.n} "
          f"| {len(runs['plain'])} of {args.n} | |")
    for label, which in (("up: all 4 nodes registered in the GCS", 0),
                         ("down: every node process gone", 1)):
        h_med, h_min = stats("hybridray", which)
        p_med, p_min = stats("plain", which)
        print(f"| {label} | {h_med:.2f} / {h_min:.2f} | {p_med:.2f} / {p_min:.2f} "
              f"| {h_med / p_med:.2f}x |")
    for name, errors in failed.items():
        for error in errors:
            print(f"\n{name} run failed: {error}")
    if args.json:
        print(json.dumps({"runs": runs, "failed": failed}))


if __name__ == "__main__":
    main()
