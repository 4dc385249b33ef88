"""``hybridray fault partition | heal``: a drill tool that cuts a site of a namespace cluster.

    hybridray up clusters/local.yaml --hosts netns
    hybridray fault partition local cloud-b     # nobody reaches cloud-b, it reaches nobody
    hybridray fault partition local cloud-b --wait   # ... and wait until the GCS sees it
    hybridray status local                      # cloud-b's nodes go dead in the GCS
    hybridray fault heal local cloud-b --wait   # its service loops bring the nodes back

Only for clusters started with ``--hosts netns``: the cut is the site's uplink going down,
the way a WAN link or VPN tunnel fails. Nothing is killed: the site's hosts keep running and
talking to each other, and its nodes rejoin by themselves once the link is back.
"""

from __future__ import annotations

import argparse
import time

from hybridray.cluster import netns
from hybridray.cluster.nshosts import record_of
from hybridray.cluster.state import cluster_lock, load_state, save_state
from hybridray.exceptions import ClusterError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fault", help="drills on a namespace cluster: cut a site off, heal it",
                       description="Cut a site's WAN link on a cluster started with --hosts "
                                   "netns, and bring it back. A drill tool: nothing is killed.")
    faults = p.add_subparsers(dest="fault", metavar="ACTION")
    faults.required = True
    for action, text in (("partition", "cut SITE off from every other site and the operator"),
                         ("heal", "bring SITE's link back; its nodes rejoin by themselves")):
        a = faults.add_parser(action, help=text, description=text)
        a.add_argument("cluster", metavar="CLUSTER")
        a.add_argument("site", metavar="SITE")
        a.add_argument("--wait", action="store_true",
                       help="then wait until the GCS sees the site's nodes "
                            + ("dead" if action == "partition" else "back, all alive")
                            + " and say how long that took")
        a.add_argument("--timeout", type=float, default=180.0,
                       help="seconds --wait waits at most (default 180)")
        a.set_defaults(func=run_fault, action=action)


def partition(name: str, site: str, *, home=None) -> None:
    """Cut ``site`` of namespace cluster ``name`` off (recorded, so ``status`` shows it)."""
    _apply(name, site, netns.partition, home)


def heal(name: str, site: str, *, home=None) -> None:
    """Bring ``site``'s link back."""
    _apply(name, site, netns.heal, home)


def _apply(name: str, site: str, action, home) -> None:
    netns.require_support()
    with cluster_lock(name, home):
        state = load_state(name, home=home)
        rec = record_of(state)
        action(rec, site)
        state.netns = rec.to_json()
        save_state(state)


def wait_for_site(name: str, site: str, *, alive: bool, timeout: float = 180.0,
                  home=None) -> float:
    """Seconds until the GCS sees every node of ``site`` dead (``alive=False``) or alive.

    Raises:
        ClusterError: not within ``timeout``.
    """
    from hybridray.cluster.status import status

    start = time.monotonic()
    while True:
        s = status(name, home=home)["sites"].get(site)
        if s is None:
            raise ClusterError(f"cluster {name!r} has no site {site!r}")
        if (s["alive"] == s["nodes"]) if alive else s["alive"] == 0:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise ClusterError(f"site {site!r} of cluster {name!r} still has {s['alive']} of "
                               f"{s['nodes']} nodes alive after {timeout:.0f}s; see "
                               f"hybridray status {name}")
        time.sleep(1.0)


def run_fault(args: argparse.Namespace) -> int:
    if args.action == "partition":
        partition(args.cluster, args.site)
        print(f"site {args.site!r} of cluster {args.cluster!r} is cut off: its link is down. "
              f"Heal it with: hybridray fault heal {args.cluster} {args.site}", flush=True)
        if args.wait:
            took = wait_for_site(args.cluster, args.site, alive=False, timeout=args.timeout)
            print(f"the GCS sees {args.site}'s nodes dead {took:.1f}s after the cut")
    else:
        heal(args.cluster, args.site)
        print(f"site {args.site!r} of cluster {args.cluster!r} is reachable again; its nodes "
              f"rejoin as their service loops restart them (watch: hybridray status "
              f"{args.cluster})", flush=True)
        if args.wait:
            took = wait_for_site(args.cluster, args.site, alive=True, timeout=args.timeout)
            print(f"{args.site}'s nodes are back, alive in the GCS, {took:.1f}s after the heal")
    return 0
