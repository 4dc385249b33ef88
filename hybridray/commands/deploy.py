"""``hybridray render | certs | submit``: the files, secrets and jobs of a real deployment.

    hybridray certs clusters/onprem-aws.yaml --out secrets/ --head-address 10.0.0.5
    hybridray render clusters/onprem-gke.yaml --out build/onprem-gke/ --head-address 10.0.0.5
    hybridray certs clusters/onprem-aws.yaml --out secrets/ --revoke-site aws
    hybridray submit --cluster local --site cloud-b --data-class public -- python jobs/where.py
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
    p.add_argument("--image", help="container image for Kubernetes pods (GPU pools: IMAGE-gpu)")
    p.add_argument("--gpu-image", help="container image for Kubernetes pods of GPU pools")
    aws = p.add_argument_group(
        "AWS, when the head runs at another site (its autoscaler launches the VMs without "
        "ray up's bootstrap, so the file must name these)")
    aws.add_argument("--aws-subnet", action="append", default=[], dest="aws_subnets",
                     metavar="SUBNET_ID", help="subnet for the VMs (repeatable)")
    aws.add_argument("--aws-security-group", action="append", default=[],
                     dest="aws_security_groups", metavar="SG_ID",
                     help="security group for the VMs (repeatable)")
    aws.add_argument("--ssh-key-name", help="EC2 key pair the VMs are launched with")
    aws.add_argument("--ssh-private-key", help="that key pair's private key, as a path on the "
                                               "machine whose autoscaler reads the file")
    aws.add_argument("--aws-ami", help="AMI for CPU pools (Ray and Python installed or "
                                       "installable)")
    aws.add_argument("--aws-gpu-ami", help="AMI for GPU pools (NVIDIA driver installed)")
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
                   metavar="[SITE=]HOST", help="another machine (a driver, an admin box) to "
                   "issue a certificate for, from SITE's CA (default: the head's site); "
                   "repeatable")
    c.add_argument("--host-ip", action="append", default=[], dest="host_ips",
                   metavar="NAME=IP", help="the IP address of a host listed by name, when it "
                   "does not resolve here (Ray dials nodes by IP; repeatable)")
    c.add_argument("--revoke-site", metavar="SITE",
                   help="stop trusting SITE: drop its CA from trust.pem, move its certificates "
                        "away, rotate the token; then restart (docs/security.md)")
    c.add_argument("--rotate-token", action="store_true",
                   help="replace the token (then redistribute it: docs/deploy.md)")
    c.set_defaults(func=run_certs)

    s = sub.add_parser(
        "submit", help="submit a job whose driver runs where the placement policy says",
        description="Decide where a job's entrypoint may run (site, data classes) and submit "
                    "it with Ray's entrypoint_label_selector; the decision is audited. "
                    "Example: hybridray submit --cluster local --site cloud-b --data-class public "
                    "-- python x.py")
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
    s.add_argument("--wait-timeout", type=float, metavar="SECONDS",
                   help="stop the job if its entrypoint waits for resources this long "
                        "(default: $HYBRIDRAY_WAIT_TIMEOUT_S or 600)")
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
                            image=args.image, gpu_image=args.gpu_image,
                            aws_subnets=tuple(args.aws_subnets),
                            aws_security_groups=tuple(args.aws_security_groups),
                            ssh_key_name=args.ssh_key_name,
                            ssh_private_key=args.ssh_private_key, aws_ami=args.aws_ami,
                            aws_gpu_ami=args.aws_gpu_ami)
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
    from hybridray.deploy.secrets import revoke

    topology = load_topology(path, overrides)
    host_ips = {}
    for item in args.host_ips:
        name, sep, ip = item.partition("=")
        if not sep or not name or not ip:
            raise ConfigError(f"--host-ip {item!r}: give NAME=IP, e.g. --host-ip "
                              "gpu-01.dc.internal=10.20.0.11")
        host_ips[name] = ip
    if args.revoke_site:
        made = revoke(topology, args.out, args.revoke_site)
    else:
        made = make_secrets(topology, args.out, head=args.head_address, hosts=args.hosts,
                            rotate_token=args.rotate_token, host_ips=host_ips)
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
                          "hybridray submit --cluster local --site cloud-b --data-class public "
                          "-- python jobs/x.py")
    if not args.cluster:
        raise ConfigError("name the cluster: --cluster NAME (or eval \"$(hybridray env NAME)\" "
                          "first, which sets HYBRIDRAY_CLUSTER)")
    if args.wait_timeout is not None:
        from hybridray.waiting import WAIT_TIMEOUT_ENV, wait_timeout

        os.environ[WAIT_TIMEOUT_ENV] = str(wait_timeout(args.wait_timeout))
    result = submit(args.cluster, entry, site=args.site, data_classes=args.data_classes,
                    prefer=args.prefer, cpus=args.cpus, working_dir=args.working_dir,
                    wait=args.wait, timeout=args.timeout, say=print)
    if args.wait and result.status != "SUCCEEDED":
        raise HybridRayError(f"job {result.job_id} ended {result.status}; logs: "
                             f"ray job logs {result.job_id}")
    return 0


