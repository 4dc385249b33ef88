"""``hybridray train CONFIG [key=value…]``: train a byte-level GPT on a cluster, placed by policy.

    hybridray train configs/train/tiny.yaml                       # cluster: the only one up
    hybridray train configs/train/tiny.yaml train.steps=50 --wan powersgd --new-run
    hybridray train configs/train/burst.yaml --cluster local --dry-run   # decisions only
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from hybridray.commands.validate import one_file
from hybridray.train.config import WAN_MODES
from hybridray.waiting import add_wait_args, apply_wait_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a GPT on a cluster with Ray Train, placed by policy",
        description="Train the model a train config describes (see configs/train/). "
                    "Arguments containing '=' are key.path=value overrides, e.g. "
                    "train.steps=100 model.size=small. Placement, storage and any checkpoint "
                    "are checked before a worker starts.")
    p.add_argument("items", nargs="+", metavar="CONFIG|key=value")
    p.add_argument("--cluster", help="cluster started by hybridray up (default: the config's "
                                     "cluster, $HYBRIDRAY_CLUSTER or the only one)")
    p.add_argument("--wan", choices=WAN_MODES, help="shorthand for wan.mode=MODE")
    p.add_argument("--dry-run", action="store_true",
                   help="decide placement and storage, print them, start nothing")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue this run's checkpoint even with another WAN mode or "
                            "precision (train.resume=always)")
    again.add_argument("--new-run", action="store_true",
                       help="start a new run NAME-YYYYmmdd-HHMMSS whatever checkpoints NAME "
                            "has (train.resume=never)")
    add_wait_args(p, "Serve replicas or other runs")
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybridray.train.config import load_train_config

    path, overrides = one_file(args.items, "train config",
                               "hybridray train configs/train/tiny.yaml train.steps=100")
    if args.wan:
        overrides.append(f"wan.mode={args.wan}")
    if args.cluster:
        overrides.append(f"cluster={args.cluster}")
    if args.resume or args.new_run:
        overrides.append(f"train.resume={'always' if args.resume else 'never'}")
    if args.queue:
        overrides.append("train.queue=true")
    apply_wait_args(args)
    config = load_train_config(path, overrides)   # every config problem before connecting

    from hybridray.api import connect

    cluster = connect(config.cluster)
    if args.dry_run:
        from hybridray.train.trainer import plan_run

        plan = plan_run(config, cluster)
        out = {"run": plan.run_name, "data_class": plan.data_class.value,
               "workers": dict(Counter(plan.placement.assign(config.train.max_workers))),
               "candidates": {c.site: c.reason for c in plan.placement.candidates},
               "excluded": plan.placement.excluded, "checkpoints": f"{plan.storage_uri}/"
               f"{plan.run_name}", "resume_step": plan.resume_step,
               "model": plan.model_config}
        print(json.dumps(out, indent=2))
        return 0

    from hybridray.train.trainer import train

    result = train(config, cluster, progress=not args.no_progress and not args.json)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        _print_result(result)
    return 0


def _fmt_bytes(n: Any) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _print_result(r: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{r.name} on {r.cluster}", show_header=False)
    table.add_row("steps", f"{r.steps} ({r.restarts} restart(s), {r.steps_redone} step(s) "
                           "redone)")
    table.add_row("eval loss", f"{r.initial_eval_loss:.4f} → {r.final_eval_loss:.4f}"
                  if r.eval_history else "-")
    table.add_row("throughput", f"{r.tokens_per_s:,.0f} tokens/s, MFU {100 * r.mfu:.2f}%"
                  if r.tokens_per_s else "-")
    table.add_row("workers", ", ".join(f"{s}×{n}" for s, n in r.workers_per_site.items())
                  + f" (data class {r.data_class})")
    w = r.wan
    table.add_row("gradient traffic",
                  f"{w.get('wan_mode')}: {_fmt_bytes(w.get('comm_bytes_per_step'))}/step "
                  f"(fp32 DDP: {_fmt_bytes(w.get('baseline_comm_bytes_per_step'))}); across "
                  f"sites {_fmt_bytes(w.get('cross_site_bytes_per_step'))}/step (fp32 DDP: "
                  f"{_fmt_bytes(w.get('baseline_cross_site_bytes_per_step'))})")
    table.add_row("checkpoint", f"{r.checkpoint or '-'}")
    table.add_row("corpus", r.corpus)
    Console().print(table)
    sys.stdout.flush()
