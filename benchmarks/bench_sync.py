"""hybridray sync against a plain ``pyarrow.fs.copy_files``: same 1 GiB, same S3 server, same run.

    python benchmarks/bench_sync.py                      # 1 GiB in 16 files of 64 MiB
    python benchmarks/bench_sync.py --gib 0.25 --files 4 # a quicker look

Targets: sync throughput >= 0.8x the plain copy's; a re-sync with nothing changed < 5% of the
full sync's time; the sync driver's peak RSS < 1 GiB (it streams; bytes never pass through it).

What runs: a generated Parquet dataset under /tmp (kept between runs) is the on-prem site's
storage; ``hybridray up`` of clusters/local.yaml (in a temporary HYBRIDRAY_HOME) provides the
three sites and cloud-a's S3 server on loopback. Each measurement runs in its own driver
process, so its peak RSS is its own: (1) the plain copy, local files to the S3 server with
pyarrow's S3 filesystem; (2) ``sync_dataset`` onprem -> cloud-a (no masking: the files travel
as they are, through Ray, written and read back and checked at cloud-a, then committed); (3)
the same sync again with nothing changed; (4) the plain copy again. The sync driver first
runs one small sync so that Ray's worker processes exist (the plain copy needs none).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = Path(tempfile.gettempdir()) / "hybridray-bench-sync"

COPY = """
import json, resource, sys, time
import pyarrow.fs as pafs
from hybridray.storage.fs import s3_filesystem
src, endpoint, dest = sys.argv[1:4]
fs = s3_filesystem(endpoint)
started = time.perf_counter()
pafs.copy_files(src, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

SYNC = """
import json, os, resource, sys, time
from hybridray.cluster import load_state, ray_env
state = load_state(os.environ["HYBRIDRAY_CLUSTER"])
os.environ.update(ray_env(state))
import hybridray
from hybridray.storage import sync_dataset
from hybridray.topology import load_topology
overrides = json.loads(sys.argv[1])
base = hybridray.connect(state.name)
cluster = hybridray.Cluster(load_topology(state.source_file, [*state.overrides, *overrides]),
                            audit=base.audit, state=state)
warm = sync_dataset("onprem:warmup", "cloud-a:warmup", cluster=cluster, data_class="internal")
out = {}
for label in ("full", "unchanged"):
    started = time.perf_counter()
    r = sync_dataset("onprem:data", "cloud-a:bench", cluster=cluster, data_class="internal")
    out[label] = {"seconds": time.perf_counter() - started, "outcome": r.outcome,
                  "bytes_moved": r.bytes_moved, "parts": r.parts_written, "rows": r.rows}
out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def generate(gib: float, files: int) -> Path:
    """``files`` Parquet files totalling ``gib`` GiB of incompressible rows (cached)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = DATA / f"onprem-{gib:g}gib-{files}f"
    data = where / "data"
    marker = where / ".complete"
    if marker.exists():
        return where
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_file = int(gib * 2**30 / files)
    rows = per_file // (8 + 8 + 4 + 40)   # id, amount, qty, 40 random bytes
    for i in range(files):
        payload = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(40), rows, [None, pa.py_buffer(rng.bytes(rows * 40))])
        table = pa.table({"id": np.arange(i * rows, (i + 1) * rows, dtype=np.int64),
                          "amount": rng.random(rows), "qty": rng.integers(0, 1000, rows,
                                                                          dtype=np.int32),
                          "payload": payload})
        pq.write_table(table, data / f"part-{i:04d}.parquet", compression="snappy",
                       row_group_size=256 * 1024)
    warm = where / "warmup"
    warm.mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": np.arange(10)}), warm / "w.parquet")
    marker.write_text("ok")
    return where


def run_child(code: str, *args: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=16)
    args = parser.parse_args()

    from hybridray.cluster import down, ray_env, up
    from hybridray.storage import s3server
    from hybridray.topology import load_topology

    where = generate(args.gib, args.files)
    nbytes = sum(f.stat().st_size for f in (where / "data").iterdir())
    home = Path(tempfile.mkdtemp(prefix="hr-bench-sync-"))
    os.environ["HYBRIDRAY_HOME"] = str(home)
    overrides = ["name=bench-sync", f"sites.onprem.storage.root=file://{where}"]
    local_yaml = ROOT / "clusters" / "local.yaml"
    topology = load_topology(local_yaml, overrides)
    server = None
    extra: list[str] = []
    state = up(topology, source_file=local_yaml, overrides=overrides, home=home,
               dashboard=False, timeout=300)
    try:
        topology = state.topology()
        storage = topology.sites["cloud-a"].storage
        if storage.scheme != "s3" or not storage.endpoint:  # no emulator from `up`: start one
            server = s3server.start(buckets=["hybridray-bench"])
            extra = ["sites.cloud-a.storage.root=s3://hybridray-bench/cloud-a",
                     f"sites.cloud-a.storage.endpoint={server.endpoint}"]
            endpoint, bucket = server.endpoint, "hybridray-bench"
        else:
            endpoint, bucket = storage.endpoint, storage.path.split("/")[0]
            s3server.create_bucket(endpoint, bucket)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(ray_env(state))
        env["PYTHONPATH"] = str(ROOT)
        plain1 = run_child(COPY, str(where / "data"), endpoint, f"{bucket}/plain-1", env=env)
        sync = run_child(SYNC, json.dumps(extra), env=env)
        plain2 = run_child(COPY, str(where / "data"), endpoint, f"{bucket}/plain-2", env=env)
    finally:
        down(state.name, home=home)
        if server is not None:
            s3server.stop(server)

    mb = nbytes / 1e6
    plain_s = (plain1["seconds"] + plain2["seconds"]) / 2
    full_s, same_s = sync["full"]["seconds"], sync["unchanged"]["seconds"]
    ratio = (mb / full_s) / (mb / plain_s)
    command = "python benchmarks/bench_sync.py" + (
        f" --gib {args.gib:g} --files {args.files}" if (args.gib, args.files) != (1.0, 16) else "")
    print(f"\n`{command}` — {args.files} Parquet files, {nbytes / 2**30:.2f} GiB, "
          f"local fs -> S3 server (moto) on 127.0.0.1, {os.cpu_count()} CPUs\n")
    print("| measurement | seconds | MB/s | vs target |")
    print("|---|---:|---:|---|")
    print(f"| plain pyarrow.fs.copy_files (mean of 2: {plain1['seconds']:.1f}, "
          f"{plain2['seconds']:.1f}) | {plain_s:.1f} | {mb / plain_s:.1f} | |")
    print(f"| hybridray sync, full ({sync['full']['parts']} parts, verified, committed) | "
          f"{full_s:.1f} | {mb / full_s:.1f} | {ratio:.2f}x plain (target >= 0.8x) "
          f"{'PASS' if ratio >= 0.8 else 'FAIL'} |")
    share = same_s / full_s
    print(f"| hybridray sync, nothing changed ({sync['unchanged']['outcome']}, "
          f"{sync['unchanged']['bytes_moved']} bytes moved) | {same_s:.2f} | - | "
          f"{100 * share:.1f}% of full (target < 5%) {'PASS' if share < 0.05 else 'FAIL'} |")
    rss = sync["rss"] / 2**20
    print(f"| sync driver peak RSS | - | - | {rss:.0f} MiB (target < 1024 MiB) "
          f"{'PASS' if rss < 1024 else 'FAIL'}; plain copy process: "
          f"{plain1['rss'] / 2**20:.0f} MiB |")
    print(f"\nexact command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
