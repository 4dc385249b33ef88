"""``hybridray render | certs | submit``: the files, secrets and jobs of a real deployment.

    hybridray certs clusters/onprem-aws.yaml --out secrets/ --head-address 10.0.0.5
    hybridray render clusters/onprem-aws.yaml --out build/onprem-aws/ --head-address 10.0.0.5
    hybridray submit --cluster local --site cloud-b -- python jobs/where.py
"""

from __future__ import annotations

import argparse
import os

from hybridray.commands.validate import one_file
from hybridray.exceptions import ConfigError, HybridRayError
from hybridray.topology import load_topology


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render", help="write the files that deploy a cluster file for real",
        description="Render a ray up file per cloud site, join scripts and a systemd unit "
                    "for static hosts, a KubeRay RayCluster per Kubernetes site and a README "
                    "(order to run, ports to open) into --out, all at once or not at all.")
    p.add_argument("items", nargs="+", metavar="FILE|key=value")
    p.add_argument("--out", required=True, help="directory to create (must be new or empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--head-address", help="HOST[:PORT] of the head's GCS as other sites reach "
                                          "it (else read from cluster.env / a ConfigMap)")
    p.add_argument("--no-tls", dest="tls", action="store_false",
                   help="render without Ray's gRPC TLS (token auth stays on)")
    p.add_argument("--secrets-dir", default="./secrets",
                   help="where ray up finds the token and CA (from hybridray certs)")
    p.add_argument("--gcp-project", help="GCP project id for provider: gcp sites")
    p.add_argument("--image", help="container image for Kubernetes pods")
    p.set_defaults(func=run_render)

    c = sub.add_parser(
        "certs", help="create a cluster's token, CA and per-host TLS certificates",
        description="Create (or complete) a secrets directory: token (Ray auth token), ca.crt "
                    "and ca.key, and nodes/HOST.crt/.key for every static host, the head "
                    "and each --host. Existing files are kept unless --rotate-token.")
    c.add_argument("items", nargs="+", metavar="FILE|key=value")
    c.add_argument("--out", required=True, help="the secrets directory")
    c.add_argument("--head-address", help="the head's host name or IP (its certificate)")
    c.add_argument("--host", action="append", default=[], dest="hosts",
                   help="another host to issue a certificate for (repeatable)")
    c.add_argument("--rotate-token", action="store_true",
                   help="replace the token (then redistribute it: docs/deploy.md)")
    c.set_defaults(func=run_certs)

    s = sub.add_parser(
        "submit", help="submit a job whose driver runs where the placement policy says",
        description="Decide where a job's entrypoint may run (site, data classes) and submit "
                    "it with Ray's entrypoint_label_selector; the decision is audited. "
                    "Example: hybridray submit --cluster local --site cloud-b -- python x.py")
    s.add_argument("--cluster", metavar="NAME", default=os.environ.get("HYBRIDRAY_CLUSTER"),
                   help="a cluster started by hybridray up (default: $HYBRIDRAY_CLUSTER, "
                        "set by hybridray env)")
    s.add_argument("--site", help="run the entrypoint at this site")
    s.add_argument("--data-class", action="append", default=[], dest="data_classes",
                   metavar="CLASS", help="a data class the job touches (repeatable)")
    s.add_argument("--prefer", default=None, help="placement preference when no --site")
    s.add_argument("--cpus", type=float, default=0.0, help="CPUs for the entrypoint")
    s.add_argument("--working-dir", default=".", help="uploaded as the job's working dir")
    s.add_argument("--no-wait", dest="wait", action="store_false",
                   help="return once submitted")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    s.add_argument("entrypoint", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="-- then the command, e.g. -- python jobs/train.py")
    s.set_defaults(func=run_submit)


def run_render(args: argparse.Namespace) -> int:
    from hybridray.deploy.common import RenderOptions
    from hybridray.deploy.render import render

    path, overrides = one_file(args.items, "cluster file", "hybridray render "
                               "clusters/onprem-aws.yaml --out build/onprem-aws/")
    topology = load_topology(path, overrides)
    options = RenderOptions(head_address=args.head_address, tls=args.tls,
                            secrets_dir=args.secrets_dir, gcp_project=args.gcp_project,
                            image=args.image)
    rendered = render(topology, args.out, options, force=args.force)
    print(f"rendered {topology.name!r} into {args.out}: {len(rendered.files)} files")
    for rel in sorted(rendered.files):
        print(f"  {rel}")
    print(f"next: read {os.path.join(args.out, 'README.md')}")
    return 0


def run_certs(args: argparse.Namespace) -> int:
    from hybridray.deploy.secrets import make_secrets

    path, overrides = one_file(args.items, "cluster file",
                               "hybridray certs clusters/onprem-aws.yaml --out secrets/")
    topology = load_topology(path, overrides)
    made = make_secrets(topology, args.out, head=args.head_address, hosts=args.hosts,
                        rotate_token=args.rotate_token)
    for line in made:
        print(line)
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from hybridray.deploy.jobs import submit

    entry = [a for a in args.entrypoint]
    if entry and entry[0] == "--":
        entry = entry[1:]
    if not entry or entry[0].startswith("-"):
        raise ConfigError("give the options first and the entrypoint after --, e.g. "
                          "hybridray submit --cluster local --site cloud-b -- python jobs/x.py")
    if not args.cluster:
        raise ConfigError("name the cluster: --cluster NAME (or eval \"$(hybridray env NAME)\" "
                          "first, which sets HYBRIDRAY_CLUSTER)")
    result = submit(args.cluster, entry, site=args.site, data_classes=args.data_classes,
                    prefer=args.prefer, cpus=args.cpus, working_dir=args.working_dir,
                    wait=args.wait, timeout=args.timeout, say=print)
    if args.wait and result.status != "SUCCEEDED":
        raise HybridRayError(f"job {result.job_id} ended {result.status}; logs: "
                             f"ray job logs {result.job_id}")
    return 0


