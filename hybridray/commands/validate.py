"""``hybridray validate FILE… [key=value…]``: check cluster files, report every problem."""

from __future__ import annotations

import argparse
import sys

from hybridray.exceptions import ConfigError
from hybridray.topology import Topology, load_topology


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check cluster files and report every problem",
                       description="Validate cluster files. Arguments containing '=' are "
                                   "key.path=value overrides applied to every file.")
    # "*", not "+": with no file the command's own message (and exit 2) beats argparse's
    p.add_argument("items", nargs="*", metavar="FILE|key=value")
    p.set_defaults(func=run)


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from file paths in a positional argument list."""
    files = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return files, overrides


def one_file(items: list[str], what: str, example: str) -> tuple[str, list[str]]:
    """The one FILE of a positional list, and its ``key=value`` overrides; a ``ConfigError``
    that shows ``example`` when there is not exactly one file."""
    files, overrides = split_overrides(items)
    if len(files) != 1:
        raise ConfigError(f"give exactly one {what} (got {len(files)}), e.g. {example}")
    return files[0], overrides


def elastic_lines(topo: Topology) -> list[str]:
    """One line per elastic pool: its range and idle timeout, and what to watch for."""
    out = []
    every = topo.head.autoscaler_interval_s
    for site_name, site in topo.sites.items():
        for pool in site.pools:
            if not pool.elastic:
                continue
            line = (f"{site_name}.{pool.name}: elastic, {pool.min_nodes}..{pool.max_nodes} "
                    f"nodes sized by Ray's autoscaler; an idle node stops after "
                    f"{pool.idle_timeout:g} s" + (" (the default)" if pool.idle_timeout_s is None
                                                  else ""))
            if pool.min_nodes:
                line += f"; {pool.min_nodes} always up"
            if pool.idle_timeout < every:
                line += (f"; note: the autoscaler looks every {every} s "
                         "(head.autoscaler_interval_s), so idle nodes stop up to that late")
            out.append(line)
    return out


def run(args: argparse.Namespace) -> int:
    files, overrides = split_overrides(args.items)
    if not files:
        raise ConfigError("no cluster file given; try: hybridray validate clusters/*.yaml")
    failed = 0
    for path in files:
        try:
            topo = load_topology(path, overrides)
        except ConfigError as e:
            failed += 1
            for line in e.problems:
                print(line, file=sys.stderr)
            continue
        print(f"{path}: ok ({topo.name}: {len(topo.sites)} sites, "
              f"{sum(len(s.pools) for s in topo.sites.values())} pools)")
        for line in elastic_lines(topo):
            print(f"  {line}")
    if failed:
        print(f"{failed} of {len(files)} file(s) invalid", file=sys.stderr)
        return 1
    return 0
