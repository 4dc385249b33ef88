"""A driver process for one training run: ``python drive_train.py CLUSTER CONFIG_JSON OUT``.

Chaos tests kill nodes of a cluster of their own, so they drive it from a separate process
(with the environment of ``hybridray.cluster.ray_env``) rather than from pytest's, which is
connected to the shared cluster. The result (or the error) is written to OUT as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    cluster_name, config_json, out = (argv or sys.argv[1:])[:3]
    from hybridray.api import connect
    from hybridray.exceptions import HybridRayError
    from hybridray.train.trainer import train

    cluster = connect(cluster_name)
    import ray

    # The test must not kill the node this driver is attached to: say which one it is.
    Path(out + ".driver-node").write_text(ray.get_runtime_context().get_node_id())
    try:
        result = train(json.loads(config_json), cluster, progress=False)
        record = {"ok": True, **result.to_dict()}
    except HybridRayError as e:
        record = {"ok": False, "type": type(e).__name__, "error": str(e)}
    Path(out).write_text(json.dumps(record, default=str))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
