"""``hybridray metrics``: hybridray's Prometheus exporter for one cluster.

    hybridray metrics local --once                   # print one scrape
    hybridray metrics local --port 9464 --budget 50  # serve /metrics until Ctrl-C
"""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help="export a cluster's sites, bytes, decisions and cost "
                                       "to Prometheus",
                       description="Serve /metrics in the Prometheus text format: site "
                                   "liveness, CPUs, cost rate and accrued cost per site, "
                                   "cross-site bytes, placement decisions (docs/operations.md).")
    p.add_argument("name", help="a cluster name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=9464, help="port to listen on (default 9464)")
    p.add_argument("--budget", type=float, default=None,
                   help="spend budget in US$, exported as hybridray_budget_dollars")
    p.add_argument("--once", action="store_true", help="print one scrape and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybridray.cluster import load_state
    from hybridray.exceptions import ConfigError
    from hybridray.metrics import render, serve_exporter

    load_state(args.name)               # ClusterNotFound, with the known names, up front
    if args.budget is not None and args.budget < 0:
        raise ConfigError(f"--budget {args.budget}: must be >= 0 (US$)")
    if args.once:
        print(render(args.name, budget=args.budget), end="")
        return 0
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: not a TCP port")
    try:
        server = serve_exporter(args.name, host=args.host, port=args.port, budget=args.budget)
    except OSError as e:
        raise ConfigError(f"--port {args.port}: cannot listen on {args.host}:{args.port} "
                          f"({e.strerror}); pick another port") from None
    print(f"serving hybridray metrics of {args.name!r} at "
          f"http://{args.host}:{args.port}/metrics (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
    return 0
