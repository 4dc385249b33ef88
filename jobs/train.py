# ray job submit --working-dir . -- python jobs/train.py configs/train/tiny.yaml --cluster local
"""Train a byte-level GPT as a Ray job (or as a plain script), placed by hybridray policy.

    eval "$(hybridray env local)"                       # RAY_API_SERVER_ADDRESS, token, ...
    ray job submit --working-dir . -- python jobs/train.py configs/train/tiny.yaml --cluster local
    python jobs/train.py configs/train/burst.yaml --cluster local wan.mode=bf16   # plain script

Arguments containing '=' are ``key.path=value`` overrides of the train config. The result
(checkpoint address, worker sites, eval losses, tokens/s, bytes across sites) is printed as
JSON on the last line; errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a plain script from anywhere: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    from hybridray.api import connect
    from hybridray.exceptions import HybridRayError
    from hybridray.train.config import load_train_config
    from hybridray.train.trainer import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a train config, e.g. configs/train/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--cluster", help="cluster name (default: $HYBRIDRAY_CLUSTER or the "
                                          "only cluster recorded)")
    parser.add_argument("--progress", action="store_true", help="live console display")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"cluster={args.cluster}"] if args.cluster else [])
    try:
        config = load_train_config(args.config, overrides)
        result = train(config, connect(config.cluster), progress=args.progress)
    except HybridRayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
