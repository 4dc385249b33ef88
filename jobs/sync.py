# ray job submit --working-dir . -- python jobs/sync.py onprem:datasets/tickets cloud-a:datasets/tickets --mask configs/masks/tickets.yaml  # noqa: E501
"""Sync a dataset from one site to another as a Ray job (or as a plain script).

    eval "$(hybridray env local)"      # RAY_API_SERVER_ADDRESS, token, HYBRIDRAY_CLUSTER
    ray job submit --working-dir . -- python jobs/sync.py \\
        onprem:datasets/tickets cloud-a:datasets/tickets --mask configs/masks/tickets.yaml
    python jobs/sync.py onprem:datasets/tickets cloud-a:datasets/tickets --cluster local

The driver only plans and commits: reads and masking run as Ray tasks at the source site,
writes at the destination site (see ``hybridray.storage.sync``). Killing this driver at any
moment leaves the destination's previous version current; running it again completes the
sync, reusing the parts that were already written and verified. Prints a summary, or one JSON
object with ``--json``; exits 2 on a refusal or a data error.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/sync.py", description=__doc__.splitlines()[0])
    p.add_argument("source", metavar="SRC")
    p.add_argument("destination", metavar="DST")
    p.add_argument("--cluster", help="cluster name (default: $HYBRIDRAY_CLUSTER or the only one)")
    p.add_argument("--mask", metavar="SPEC.yaml")
    p.add_argument("--data-class", choices=["public", "internal", "confidential", "restricted"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--checksum", action="store_true")
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--part-mb", type=float, default=64,
                   help="target size of a re-encoded part (0: one row group per part)")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per read and write task")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import hybridray
    from hybridray.exceptions import HybridRayError
    from hybridray.storage.report import print_summary
    from hybridray.storage.sync import sync_dataset

    try:
        cluster = hybridray.connect(args.cluster)
        result = sync_dataset(args.source, args.destination, cluster=cluster, mask=args.mask,
                              data_class=args.data_class, overwrite=args.overwrite,
                              checksum=args.checksum, keep_versions=args.keep,
                              part_bytes=int(args.part_mb * 2**20), cpus=args.cpus,
                              progress=True)
    except HybridRayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
