"""``hybridray scale NAME``: ask Ray's autoscaler for elastic-pool nodes ahead of the work.

    hybridray scale elastic --nodes cloud-a.cpu=1 --wait     # keep one cloud-a node ready
    hybridray plan clusters/elastic.yaml --demand confidential:cpu=48 --hours 24 --json > plan.json
    hybridray scale elastic --plan plan.json                 # what the cost plan needs, on average
    hybridray scale elastic --clear                          # drop the request; idle nodes stop

The request (one bundle and label selector per node: site and pool) goes through Ray's
``AutoscalingCoordinator``, merged with Ray Data's and Ray Train's requests
(``hybridray.cluster.scale``), replaces hybridray's previous one, and is audited.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hybridray.exceptions import ConfigError

WAIT_S = 300.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scale", help="pre-provision elastic pools through Ray's autoscaler",
        description="Ask Ray's autoscaler to keep nodes of elastic pools ready "
                    "(bundles with label selectors, through Ray's AutoscalingCoordinator). "
                    "Replaces the previous request; --clear drops it, and idle nodes then "
                    "stop.")
    p.add_argument("name", help="a running cluster (hybridray status lists them)")
    p.add_argument("--nodes", action="append", default=[], metavar="SITE.POOL=N",
                   help="keep N nodes of an elastic pool; repeat for more pools")
    p.add_argument("--plan", metavar="JSON",
                   help="the output of `hybridray plan FILE ... --json`: each elastic pool "
                        "gets its average node count over the plan's horizon")
    p.add_argument("--clear", action="store_true", help="drop the request")
    p.add_argument("--wait", action="store_true",
                   help="wait until the requested nodes have joined the cluster")
    p.add_argument("--timeout", type=float, default=WAIT_S,
                   help=f"seconds --wait may take (default {WAIT_S:g})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import hybridray
    from hybridray.cluster import elastic, scale

    given = sum([bool(args.nodes), bool(args.plan), args.clear])
    if given != 1:
        raise ConfigError("say what to provision: one of --nodes SITE.POOL=N, --plan "
                          "plan.json or --clear (e.g. hybridray scale NAME --nodes "
                          "cloud-a.cpu=1)")
    state = hybridray.cluster.load_state(args.name)    # ClusterNotFound names the known ones
    topology = state.topology()
    if not state.autoscaler:
        raise ConfigError(f"cluster {args.name!r} has no elastic pool, so no autoscaler to ask; "
                          "give a pool min and max instead of count (docs/topology.md)")
    if args.plan:
        path = Path(args.plan)
        try:
            plan = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--plan {args.plan}: cannot read a JSON plan ({e}); write one "
                              "with hybridray plan FILE --demand ... --json > plan.json") from None
        requests, source = scale.from_plan(topology, plan), f"plan:{path.name}"
    elif args.nodes:
        requests, source = scale.parse_nodes(topology, args.nodes), "nodes"
    else:
        requests, source = [], "clear"
    cluster = hybridray.connect(args.name)
    drift = cluster.drift()     # a non-member with the pool's labels is no room for the request
    record = scale.request(topology, requests, audit=cluster.audit, source=source,
                           avoid=[d.node_id for d in drift])
    for d in drift:
        print(f"  not counting drift node {d.node_id[:12]} (site {d.site or '?'}): {d.why}")
    if not requests:
        print(f"cleared the request on {args.name!r}; idle autoscaled nodes stop after their "
              "pool's idle timeout")
    for r in requests:
        print(f"  {r.node_type:<20} {r.nodes} node(s)" + (f"  ({r.note})" if r.note else ""))
    print(f"asked Ray's autoscaler for {record['bundles']} node bundle(s) (audited as "
          "scale-request); it keeps them until the next hybridray scale or --clear")
    if args.wait and record["bundles"]:
        have = elastic.wait_for_nodes(state, {r.node_type: r.nodes for r in requests
                                              if r.nodes}, timeout=args.timeout)
        print("ready: " + ", ".join(f"{n} {t}" for t, n in have.items()))
    return 0
