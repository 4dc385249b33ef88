"""``hybridray demo``: the local hybrid demo (the README's main job).

    hybridray demo                    # the full demo, a few minutes on a 2-core laptop
    hybridray demo --quick            # small steps and models (CI)
    hybridray demo --report-dir out/  # where report.md, report.json and the plots go
    hybridray demo --hosts netns      # each node a host with shaped links; a partition (root)
"""

from __future__ import annotations

import argparse
import signal
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the local three-site hybrid demo end to end",
                       description="Bring up clusters/local.yaml as a real Ray cluster, prepare "
                                   "restricted data on-prem, sync a masked copy to a cloud (and "
                                   "see a raw one refused), train with DDP in bf16, serve int8 "
                                   "models at several sites, kill a cloud node under load, tear "
                                   "everything down and write a report.")
    p.add_argument("--cluster-file", default=None, help="cluster file (default: local.yaml)")
    p.add_argument("--name", default="demo", help="cluster name to use (default: demo)")
    p.add_argument("--quick", action="store_true",
                   help="small steps, short load phases (CI; about 3 minutes)")
    p.add_argument("--hosts", choices=("local", "netns"), default="local",
                   help="netns: every node a host of its own in a network namespace, links "
                        "shaped to the cluster file, cloud-b cut off and healed instead of "
                        "killed, traffic per link in the report (needs root)")
    p.add_argument("--report-dir", default=None,
                   help="where to write the report (default: $HYBRIDRAY_HOME/reports/NAME)")
    p.set_defaults(func=run)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    from hybridray.demo import CLUSTER_FILE, run_demo

    # SIGTERM (e.g. from `timeout`) tears the cluster down, as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        facts = run_demo(args.cluster_file or CLUSTER_FILE, name=args.name, quick=args.quick,
                         report_dir=args.report_dir, hosts=args.hosts)
    finally:
        signal.signal(signal.SIGTERM, previous)
    burst = facts.get("burst", {})
    return 1 if (facts.get("processes", {}).get("left") or burst.get("error")
                 or burst.get("left")) else 0
