"""``hybridray demo`` end to end: the wall time of each step and of the whole command.

    python benchmarks/bench_demo.py --quick --repeats 3     # target: about 3 minutes
    python benchmarks/bench_demo.py                          # the full demo: target < 10 min

Runs the installed ``hybridray`` command (this venv's) as a user would, each repeat in a
fresh HYBRIDRAY_HOME, and reads each step's seconds back from the demo's report.json.
There is no plain alternative to compare with: the figures are the demo's own targets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import Section, median, repeats_table, verdict  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="hybridray demo --quick")
    p.add_argument("--repeats", type=int, default=1)
    return p


def run_once(quick: bool) -> dict:
    home = tempfile.mkdtemp(prefix="hr-bench-demo-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HYBRIDRAY_"))}
    env["HYBRIDRAY_HOME"] = home
    cmd = [str(Path(sys.executable).parent / "hybridray"), "demo", "--name", "bench-demo",
           "--report-dir", f"{home}/report", *(["--quick"] if quick else [])]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True)
    wall = time.perf_counter() - started
    facts = json.loads(Path(home, "report", "report.json").read_text())
    return {"wall": wall, "rc": proc.returncode, "steps": facts["steps"],
            "left": len((facts.get("processes") or {}).get("left", []))}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    section = Section(__file__, argv)
    runs = [run_once(args.quick) for _ in range(args.repeats)]
    names = [s["name"] for s in runs[0]["steps"]]
    rows = [(f"{name} (s)", [next((s["seconds"] for s in r["steps"] if s["name"] == name),
                                  float("nan")) for r in runs], "{:.1f}") for name in names]
    rows.append(("**whole command, wall (s)**", [r["wall"] for r in runs], "{:.1f}"))
    rows.append(("exit code", [r["rc"] for r in runs], "{:.0f}"))
    rows.append(("processes left after down", [r["left"] for r in runs], "{:.0f}"))
    target = 180 if args.quick else 600
    print(section.header(f"hybridray demo{' --quick' if args.quick else ''}, "
                         f"{args.repeats} repeat(s), each in a fresh HYBRIDRAY_HOME"))
    print(repeats_table(rows, "step (per repeat)"))
    wall = median(r["wall"] for r in runs)
    print(f"\nmedian wall {wall:.0f} s (target {'about ' if args.quick else '< '}{target} s): "
          f"{verdict(wall, target * (1.1 if args.quick else 1), at_least=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
