"""``hybridray attach | detach | admit``: drive a cluster you run, and say which nodes belong.

    hybridray attach prod --address 10.20.0.5:6379 --topology clusters/onprem-aws.yaml
    hybridray attach prod --address 10.20.0.5:6379 --topology clusters/onprem-aws.yaml \\
        --token-file secrets/token --tls-dir secrets/ --dashboard http://10.20.0.5:8265
    hybridray admit prod 3f9c2a1b7e40                 # a node added since attach
    hybridray detach prod                             # forget it; the cluster keeps running
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hybridray.commands.validate import split_overrides
from hybridray.exceptions import ConfigError

DEFAULT_SECRETS = "secrets"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attach", help="record a running cluster hybridray did not start, by its address",
        description="Check that the cluster at --address can be reached and trusted (TLS, "
                    "token), read its live nodes and record it under NAME like a cluster "
                    "from hybridray up: nodes whose labels fit --topology become members, "
                    "the others are reported as drift and never placed on. Arguments after "
                    "--topology FILE containing '=' are key.path=value overrides of it.")
    p.add_argument("name", metavar="NAME", help="the name every command will use for it")
    p.add_argument("--address", required=True, metavar="HOST:PORT",
                   help="the head's GCS address (port 6379 unless changed)")
    p.add_argument("--topology", required=True, metavar="FILE",
                   help="the cluster file its nodes were started from")
    p.add_argument("items", nargs="*", metavar="key=value",
                   help="overrides of the topology, e.g. sites.cloud-a.pools.0.count=2")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help=f"the cluster's Ray auth token (default: {DEFAULT_SECRETS}/token, as "
                        "hybridray certs writes it)")
    p.add_argument("--tls-dir", default=None, metavar="DIR",
                   help=f"the hybridray certs directory: trust.pem and nodes/HOST.crt for "
                        f"this machine (default: {DEFAULT_SECRETS}/ when it holds a ca.crt)")
    p.add_argument("--tls-host", default=None, metavar="NAME",
                   help="which nodes/NAME.crt this machine presents (default: its host "
                        "name, else a local-SITE one)")
    p.add_argument("--no-tls", action="store_true",
                   help="the cluster runs without Ray's gRPC TLS")
    p.add_argument("--dashboard", default=None, metavar="URL",
                   help="the dashboard / Jobs API (default: http://HOST:8265 if a Ray "
                        "dashboard answers there)")
    p.add_argument("--wait-nodes", type=int, default=0, metavar="N",
                   help="first wait until N nodes are alive (nodes that register after "
                        "attach are drift until admitted), and for --dashboard to answer")
    p.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                   help="how long --wait-nodes waits, all told (default 120)")
    p.set_defaults(func=run_attach)

    d = sub.add_parser("detach", help="forget an attached cluster (it keeps running)",
                       description="Remove the record of a cluster recorded by hybridray "
                                   "attach. Its nodes and work are not touched; its audit "
                                   "log stays.")
    d.add_argument("name", metavar="NAME")
    d.set_defaults(func=run_detach)

    a = sub.add_parser(
        "admit", help="make live nodes members of a cluster, so placed work may use them",
        description="A node that joined after up/attach is drift until admitted: never "
                    "placed on. Admit it by node id (or its first 12 digits, as hybridray "
                    "status lists it); --all admits every live non-member whose labels fit "
                    "the topology. A node whose labels claim more than its site may hold "
                    "is never admitted. Members the GCS reports dead are dropped.")
    a.add_argument("name", metavar="NAME")
    a.add_argument("node_ids", nargs="*", metavar="NODE_ID")
    a.add_argument("--all", action="store_true",
                   help="admit every live non-member whose labels fit the topology")
    a.set_defaults(func=run_admit)


def run_attach(args: argparse.Namespace) -> int:
    from hybridray.cluster.attachment import attach, tls_from_dir

    files, overrides = split_overrides(args.items)
    if files:
        raise ConfigError(f"attach: unexpected argument {files[0]!r}; overrides of the "
                          "topology are key.path=value")
    if args.no_tls and args.tls_dir:
        raise ConfigError("give --tls-dir or --no-tls, not both")
    tls = None
    if not args.no_tls:
        tls_dir = args.tls_dir or (DEFAULT_SECRETS if (Path(DEFAULT_SECRETS) / "ca.crt")
                                   .is_file() else None)
        if tls_dir is not None:
            tls = tls_from_dir(tls_dir, args.tls_host)
    attach(args.name, args.address, args.topology, overrides=overrides,
           token_path=args.token_file, tls=tls, dashboard_url=args.dashboard,
           wait_nodes=args.wait_nodes, wait_s=args.wait,
           say=lambda line: print(line, flush=True))
    print(f"connect a shell:  eval \"$(hybridray env {args.name})\"; every command takes "
          f"the name {args.name!r}")
    return 0


def run_detach(args: argparse.Namespace) -> int:
    from hybridray.cluster.attachment import detach

    state = detach(args.name)
    print(f"forgot cluster {args.name!r} (GCS {state.address}); it keeps running, its audit "
          "log stays")
    return 0


def run_admit(args: argparse.Namespace) -> int:
    from hybridray.cluster.membership import admit_nodes

    if bool(args.node_ids) == bool(args.all):
        raise ConfigError("name the nodes to admit (hybridray admit NAME NODE_ID ...; hybridray "
                          "status NAME lists drift with ids) or pass --all")
    result = admit_nodes(args.name, None if args.all else args.node_ids)
    for m in result.admitted:
        print(f"admitted {m.node_id[:12]} at {m.site} ({m.key or m.pool or 'node'})")
    for d in result.refused:
        print(f"NOT admitted {d.node_id[:12]} (site {d.site or '?'}): {d.why}")
    for m in result.pruned:
        print(f"dropped {m.node_id[:12]} at {m.site}: the GCS reports it dead")
    if not (result.admitted or result.refused or result.pruned):
        print("nothing to admit: every live node that fits is a member")
    for d in result.drift:
        print(f"still drift {d.node_id[:12]} (site {d.site or '?'}): {d.why}")
    return 2 if result.refused else 0
