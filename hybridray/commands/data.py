"""``hybridray sync | verify | ls``: move datasets between sites, check them, list them.

    hybridray sync onprem:datasets/tickets cloud-a:datasets/tickets --mask masks/tickets.yaml
    hybridray verify cloud-a:datasets/tickets
    hybridray ls cloud-a:                       # every committed dataset at a site
    hybridray ls cloud-a:datasets/tickets --files

The cluster is ``--cluster NAME``, else ``$HYBRIDRAY_CLUSTER``, else the only one recorded.
"""

from __future__ import annotations

import argparse
import json
import os

from hybridray.exceptions import ClusterNotFound
from hybridray.waiting import add_wait_args, apply_wait_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sync", help="copy a dataset to another site: masked, verified, atomic, incremental",
        description="Read SRC at its site, mask it there, write it to DST at the destination "
                    "site, verify every part, and commit a new version atomically. Unchanged "
                    "files are not moved again.")
    p.add_argument("source", metavar="SRC", help="SITE:PATH, e.g. onprem:datasets/tickets")
    p.add_argument("destination", metavar="DST", help="SITE:PATH, e.g. cloud-a:datasets/tickets")
    _cluster_arg(p)
    p.add_argument("--mask", metavar="SPEC.yaml", help="masking rules applied at the source")
    p.add_argument("--data-class", choices=["public", "internal", "confidential", "restricted"],
                   help="the source's class if it has no manifest (default: restricted)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a destination that holds a different dataset")
    p.add_argument("--checksum", action="store_true",
                   help="re-hash every source file and re-verify every kept part")
    p.add_argument("--keep", type=int, default=3, metavar="N",
                   help="committed versions to keep at the destination (default: 3)")
    p.add_argument("--part-mb", type=float, default=64,
                   help="target size of a re-encoded part (default: 64; 0: one row group each)")
    p.add_argument("--cpus", type=float, default=1.0,
                   help="CPUs per read and per write task (default: 1)")
    add_wait_args(p, "actors at either site")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_sync)

    v = sub.add_parser("verify", help="re-check every part of a dataset against its manifest",
                       description="Read every part of the committed version at its site and "
                                   "check sha256, size, rows and schema.")
    v.add_argument("address", metavar="SITE:PATH")
    _cluster_arg(v)
    v.add_argument("--version", type=int, help="a kept version (default: the current one)")
    v.add_argument("--full", action="store_true", help="also decode every page (CRC checks)")
    v.add_argument("--local", action="store_true",
                   help="read in this process instead of in tasks at the dataset's site "
                        "(sha256 and size only unless this machine's site may hold the "
                        "dataset's class; --full is refused there)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=run_verify)

    ls = sub.add_parser("ls", help="list committed datasets at a site, or one dataset's parts",
                        description="Only committed versions are shown; staged parts of "
                                    "interrupted syncs are not.")
    ls.add_argument("address", metavar="SITE:[PATH]")
    _cluster_arg(ls)
    ls.add_argument("--files", action="store_true", help="list the parts of the dataset")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_ls)


def _cluster_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", metavar="NAME",
                   help="cluster to use (default: $HYBRIDRAY_CLUSTER or the only one up)")


def run_sync(args: argparse.Namespace) -> int:
    import hybridray
    from hybridray.storage.report import print_summary
    from hybridray.storage.sync import sync_dataset

    apply_wait_args(args)
    cluster = hybridray.connect(args.cluster)
    result = sync_dataset(args.source, args.destination, cluster=cluster, mask=args.mask,
                          data_class=args.data_class, overwrite=args.overwrite,
                          checksum=args.checksum, keep_versions=args.keep,
                          part_bytes=int(args.part_mb * 2**20), cpus=args.cpus,
                          progress=not args.json, queue=args.queue)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_summary(result)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from hybridray.storage.verify import verify_dataset

    if args.local:
        cluster = _offline_cluster(args.cluster)
    else:
        import hybridray

        cluster = hybridray.connect(args.cluster)
    report = verify_dataset(args.address, cluster=cluster, version=args.version,
                            full=args.full, local=args.local)
    if args.json:
        print(json.dumps(report.__dict__, indent=2))
    else:
        where = "in this process" if report.site == "this process" else f"at {report.site}"
        print(f"{report.address} version {report.version}: {report.parts} parts, "
              f"{report.rows:,} rows, {report.bytes:,} bytes verified ({report.checked}) "
              f"{where} in {report.seconds:.1f}s: OK")
    return 0


def run_ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hybridray.storage.readers import list_datasets, open_dataset

    cluster = _offline_cluster(args.cluster)
    if args.files:
        ds = open_dataset(args.address, cluster=cluster)
        rows = [{"path": p.path, "rows": p.rows, "bytes": p.bytes, "sha256": p.sha256,
                 "source": p.source.file} for p in ds.manifest.parts]
        if args.json:
            print(json.dumps({"address": str(ds.address), "version": ds.version,
                              "parts": rows}, indent=2))
            return 0
        table = Table("part", "rows", "bytes", "sha256", "from")
        for r in rows:
            table.add_row(r["path"], f"{r['rows']:,}", f"{r['bytes']:,}", r["sha256"][:16],
                          r["source"])
        Console().print(f"{ds.address} version {ds.version} ({ds.data_class})")
        Console().print(table)
        return 0
    found = list_datasets(args.address, cluster=cluster)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print(f"no committed datasets at {args.address}")
        return 0
    table = Table("dataset", "version", "class", "rows", "bytes", "committed", "from")
    for d in found:
        if "error" in d:
            table.add_row(d["address"], "-", "-", "-", "-", "-", f"[red]{d['error']}[/]")
            continue
        flags = " (masked)" if d["masked"] else ""
        flags += " (encrypted)" if d["encrypted"] else ""
        table.add_row(d["address"], f"{d['version']} (kept: {len(d['versions'])})",
                      d["data_class"] + flags, f"{d['rows']:,}", f"{d['bytes']:,}",
                      d["committed_at"], d["source"] or "")
    Console().print(table)
    return 0


class _Offline:
    """A cluster's topology, audit and home without a Ray connection (for ls/verify --local)."""

    def __init__(self, state):
        from hybridray.audit import AuditLog

        self.state = state
        self.topology = state.topology()
        self.name = state.name
        self.audit = AuditLog.for_cluster(state.name, state.home)


def _offline_cluster(name: str | None) -> _Offline:
    from hybridray import cluster as lifecycle

    name = name or os.environ.get("HYBRIDRAY_CLUSTER")
    if name is None:
        known = lifecycle.list_clusters()
        if len(known) != 1:
            raise ClusterNotFound("say which cluster: --cluster NAME or set HYBRIDRAY_CLUSTER "
                                  f"(recorded clusters: {', '.join(known) or 'none'})")
        name = known[0]
    return _Offline(lifecycle.load_state(name))
