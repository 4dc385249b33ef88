"""``hybridray demo``: the local hybrid demo (the README's main job)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the local three-site hybrid demo end to end",
                       description="Bring up clusters/local.yaml as a real Ray cluster, place "
                                   "work by policy, burst to cloud, plan costs, audit, and "
                                   "tear everything down.")
    p.add_argument("--cluster-file", default=None, help="cluster file (default: local.yaml)")
    p.add_argument("--name", default="demo", help="cluster name to use (default: demo)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybridray.demo import CLUSTER_FILE, run_demo

    facts = run_demo(args.cluster_file or CLUSTER_FILE, name=args.name)
    return 1 if facts.get("processes_left") else 0
