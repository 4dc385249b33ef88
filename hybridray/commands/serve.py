"""``hybridray serve CONFIG [key=value ...]``: deploy, change, inspect or remove a service.

    hybridray serve jobs/configs/serve-embed.yaml                         # deploy / update
    hybridray serve jobs/configs/serve-lm.yaml models.0.versions.1.weight=50   # shift traffic
    hybridray serve jobs/configs/serve-lm.yaml --promote lm@v2            # v2 only, safely
    hybridray serve jobs/configs/serve-embed.yaml --plan                  # where, and why
    hybridray serve jobs/configs/serve-embed.yaml --render > serve.yaml   # for serve deploy
    hybridray serve jobs/configs/serve-embed.yaml --status | --delete
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from hybridray.commands.validate import one_file
from hybridray.exceptions import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve models over an OpenAI-style HTTP API with Ray Serve, per site",
        description="Deploy (or update) the service a serve file describes on a running "
                    "cluster. Arguments containing '=' are key.path=value overrides, e.g. "
                    "http.port=8001 or models.0.versions.1.weight=50.")
    p.add_argument("items", nargs="+", metavar="CONFIG|key=value")
    p.add_argument("--cluster", help="cluster name (default: the file's cluster, "
                                     "$HYBRIDRAY_CLUSTER or the only one recorded)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--plan", action="store_true",
                      help="show where each model version would run and why; deploy nothing")
    what.add_argument("--render", action="store_true",
                      help="print the Serve config (YAML) that `serve deploy` accepts")
    what.add_argument("--status", action="store_true", help="show the running service")
    what.add_argument("--delete", action="store_true", help="remove the service")
    what.add_argument("--promote", metavar="MODEL@VERSION",
                      help="send all traffic to VERSION and remove MODEL's other versions")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="submit and return without waiting for the service to run")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per step (600)")
    p.add_argument("--wait-timeout", type=float, metavar="SECONDS",
                   help="give up on replicas that wait for resources after this long "
                        "(default: $HYBRIDRAY_WAIT_TIMEOUT_S or 600)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybridray.serve.config import load_serve_config

    path, overrides = one_file(args.items, "serve file",
                               "hybridray serve jobs/configs/serve-embed.yaml")
    if args.cluster:
        overrides = [*overrides, f"cluster={args.cluster}"]
    config = load_serve_config(path, overrides)
    if args.wait_timeout is not None:
        from hybridray.waiting import WAIT_TIMEOUT_ENV, wait_timeout

        os.environ[WAIT_TIMEOUT_ENV] = str(wait_timeout(args.wait_timeout))
    if args.plan or args.render:
        return _plan(config, render=args.render, as_json=args.json)
    from hybridray.serve import service as D

    cluster = _connect(config)
    if args.delete:
        gone = D.delete(config.name, timeout_s=args.timeout)
        print(f"removed {len(gone)} application(s) of {config.name!r}" if gone else
              f"service {config.name!r} is not deployed")
        return 0
    if args.status:
        _print_status(D.service_status(config.name), args.json)
        return 0
    if args.promote:
        model, _, version = args.promote.partition("@")
        if not version:
            raise ConfigError("--promote takes MODEL@VERSION, e.g. --promote lm@v2")
        config = D._only(config, model, version)
    service = D.deploy(config, cluster=cluster, wait=args.wait, timeout_s=args.timeout,
                       progress=lambda line: print(line, flush=True))
    if args.json:
        print(json.dumps({"url": service.url, "status": service.status()}, indent=2))
        return 0
    _print_status(service.status(), False)
    print(f"\nOpenAI base URL: {service.url}/v1")
    auth = "-H \"Authorization: Bearer $TOKEN\" " if config.auth.enabled else ""
    m = config.models[0]
    route, body = ("embeddings", f'{{"model": "{m.name}", "input": "hello"}}') \
        if m.kind == "embedding" else \
        ("completions", f'{{"model": "{m.name}", "prompt": "Hello", "max_tokens": 16}}')
    print(f"try: curl -s {service.url}/v1/{route} {auth}-H 'Content-Type: application/json' "
          f"-d '{body}'")
    return 0


def _plan(config, *, render: bool, as_json: bool) -> int:
    import yaml

    from hybridray.serve.plan import plan_service
    from hybridray.serve.service import read_token_digests

    topology = _topology(config)
    plan = plan_service(config, topology)
    if render:
        print(f"# Serve config for service {config.name!r} on cluster {topology.name!r}: "
              "serve deploy FILE")
        print(yaml.safe_dump(plan.serve_config(read_token_digests(config)), sort_keys=False))
        return 0
    rows = [{"model": r.model, "version": r.version, "site": r.site, "app": r.app,
             "replicas": f"{r.options['autoscaling_config']['min_replicas']}-"
                         f"{r.options['autoscaling_config']['max_replicas']}",
             "quantize": r.spec["quantize"], "data_class": r.spec["data_class"],
             "label_selector": r.options["ray_actor_options"]["label_selector"],
             "reason": r.placement.primary.reason} for r in plan.replicas]
    if as_json:
        print(json.dumps({"replicas": rows, "ingress_sites": plan.ingress_sites,
                          "data_class": plan.data_class.value,
                          "transfers": plan.transfers}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"service {config.name} on {topology.name} "
                        f"(data class {plan.data_class.value})")
    cols = ("model", "version", "site", "replicas", "quantize", "data_class")
    for col in cols:
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[c]) for c in cols))
    console = Console(highlight=False)
    console.print(table)
    for r in rows:
        console.print(f"  {r['model']}@{r['version']} at {r['site']}: {r['reason']}")
    console.print(f"ingress: {config.ingress.replicas} replica(s) at "
                  f"{', '.join(plan.ingress_sites)}")
    for t in plan.transfers:
        console.print(f"transfer: {t['what']} {t['src']} -> {t['dst']} ({t['bytes']} bytes, "
                      f"${t['cost']:.4f})")
    return 0


def _connect(config):
    """``hybridray.connect``: the one connect path (it sets Ray's auth before ``ray.init``)."""
    import hybridray

    return hybridray.connect(config.cluster)


def _topology(config):
    import os

    from hybridray import cluster as lifecycle

    name = config.cluster or os.environ.get("HYBRIDRAY_CLUSTER")
    if name is None:
        known = lifecycle.list_clusters()
        if len(known) != 1:
            raise ConfigError("say which cluster to place on: cluster=NAME or --cluster NAME "
                              f"(recorded: {', '.join(known) or 'none'})")
        name = known[0]
    return lifecycle.load_state(name).topology()


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
        return
    if not status:
        print("not deployed")
        return
    for app, s in sorted(status.items()):
        for dep, d in s["deployments"].items():
            replicas = ", ".join(f"{k.lower()} {v}" for k, v in d["replicas"].items())
            print(f"{app:<40} {dep:<28} {d['status']:<12} {replicas}")
