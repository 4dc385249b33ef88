"""The ``hybridray`` command: a small table from command name to the module that implements it.

Each module in ``hybridray.commands`` exposes ``register(subparsers)``, which adds its
sub-command(s) and sets ``func``; the function's arguments are the command's schema. Errors
that hybridray raises on purpose (``HybridRayError``) print as one clear message and exit 2;
they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hybridray.exceptions import HybridRayError

# command modules, in the order `hybridray --help` lists them
COMMAND_MODULES = [
    "validate",
    "cluster",   # up, down, status, env
    "fault",     # partition, heal (namespace clusters)
    "attach",    # attach, detach, admit
    "scale",     # pre-provision elastic pools through Ray's autoscaler
    "plan",
    "place",     # place, audit
    "data",      # sync, verify, ls
    "serve",
    "train",
    "demo",
    "metrics",   # the Prometheus exporter
    "deploy",    # render, certs, submit
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridray",
        description="One Ray cluster across on-prem and cloud sites, placed by policy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"hybridray.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as the command: drivers of namespace clusters may move to the head
        from hybridray.cluster import nshosts

        nshosts.REEXEC_CLI = True
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key.path=value` overrides may follow options (`hybridray train C --dry-run k=v`);
    # argparse stops filling a positional list at the first option, so gather them here.
    if extra and hasattr(args, "items") and all("=" in a and not a.startswith("-")
                                                  for a in extra):
        args.items = [*args.items, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result = args.func(args)
    except HybridRayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
