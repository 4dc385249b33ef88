"""hybridray sync against a plain ``pyarrow.fs.copy_files``: same 1 GiB, same S3 server, same run.

    python benchmarks/bench_sync.py                      # 1 GiB in 16 files of 64 MiB
    python benchmarks/bench_sync.py --gib 0.25 --files 4 # a quicker look

Targets: sync throughput >= 0.8x the plain copy's; a re-sync with nothing changed < 5% of the
full sync's time; the sync driver's peak RSS < 1 GiB (it streams; bytes never pass through it).

What runs: a generated Parquet dataset under /tmp (kept between runs) is the on-prem site's
storage; ``hybridray up`` of clusters/local.yaml (in a temporary HYBRIDRAY_HOME, cloud-a's
root overridden to ``s3://`` so that the cluster's own loopback S3 server serves it) gives the
three sites. One driver process warms Ray's workers up with a tiny sync, then runs
``--rounds`` interleaved rounds, each: the plain copy (``pyarrow.fs.copy_files``, local files
to the S3 server, in a process of its own so its memory is not the driver's); a full
``sync_dataset`` onprem -> cloud-a (no masking: the files travel as they are, through Ray,
are written, read back and checked at cloud-a, then committed); the same sync again with
nothing changed; then both copies are deleted. Medians are reported, with every round, since
a shared 2-core machine is noisy. The driver's peak RSS covers all rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
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
import json, os, resource, subprocess, sys, time
from hybridray.cluster import load_state, ray_env
state = load_state(os.environ["HYBRIDRAY_CLUSTER"])
os.environ.update(ray_env(state))
import hybridray
from hybridray.storage import dataset_store, parse_address, sync_dataset
src_dir, endpoint, bucket, rounds, copy_code = sys.argv[1:6]
cluster = hybridray.connect(state.name)
topo = cluster.topology

def wipe(address):
    store = dataset_store(topo, parse_address(address, topo))
    store.delete(list(store.list()))

sync_dataset("onprem:warmup", "cloud-a:warmup", cluster=cluster, data_class="internal")
out = {"plain": [], "full": [], "unchanged": [], "phases": []}
for r in range(int(rounds)):
    # the plain copy runs in its own process (its memory is not the driver's), in between
    proc = subprocess.run([sys.executable, "-c", copy_code, src_dir, endpoint,
                           f"{bucket}/plain-{r}"], capture_output=True, text=True, check=True)
    out["plain"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    wipe(f"cloud-a:plain-{r}")
    started = time.perf_counter()
    full = sync_dataset("onprem:data", f"cloud-a:bench-{r}", cluster=cluster,
                        data_class="internal")
    out["full"].append({"seconds": time.perf_counter() - started, "parts": full.parts_written,
                        "bytes_moved": full.bytes_moved})
    out["phases"].append(full.phases)
    started = time.perf_counter()
    same = sync_dataset("onprem:data", f"cloud-a:bench-{r}", cluster=cluster,
                        data_class="internal")
    out["unchanged"].append({"seconds": time.perf_counter() - started, "outcome": same.outcome,
                             "bytes_moved": same.bytes_moved})
    wipe(f"cloud-a:bench-{r}")
out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def generate(gib: float, files: int) -> Path:
    """``files`` Parquet files totalling ``gib`` GiB of incompressible rows (cached)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = DATA / f"onprem-{gib:g}gib-{files}f-v3"
    data = where / "data"
    marker = where / ".complete"
    if marker.exists():
        return where
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_file = int(gib * 2**30 / files)
    rows = int(per_file / 55.6)   # id 8 + amount 8 + qty ~0.4 (dictionary) + 40 random bytes
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
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of plain copy, full sync, unchanged sync")
    parser.add_argument("--object-store-mb", type=int, default=100,
                        help="object store of the onprem and cloud-a nodes (local.yaml: 100)")
    args = parser.parse_args()

    from hybridray.cluster import down, ray_env, up
    from hybridray.topology import load_topology

    where = generate(args.gib, args.files)
    nbytes = sum(f.stat().st_size for f in (where / "data").iterdir())
    home = Path(tempfile.mkdtemp(prefix="hr-bench-sync-"))
    os.environ["HYBRIDRAY_HOME"] = str(home)
    # cloud-a on S3 with no endpoint: `hybridray up` serves it from the cluster's S3 server
    overrides = ["name=bench-sync", f"sites.onprem.storage.root=file://{where}",
                 "sites.cloud-a.storage.root=s3://hybridray-bench/cloud-a"]
    if args.object_store_mb != 100:
        overrides += [f"sites.{site}.pools.0.object_store_mb={args.object_store_mb}"
                      for site in ("onprem", "cloud-a")]
    local_yaml = ROOT / "clusters" / "local.yaml"
    state = up(load_topology(local_yaml, overrides), source_file=local_yaml,
               overrides=overrides, home=home, dashboard=False, timeout=300)
    try:
        endpoint = state.topology().sites["cloud-a"].storage.endpoint
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(ray_env(state))
        env["PYTHONPATH"] = str(ROOT)
        res = run_child(SYNC, str(where / "data"), endpoint, "hybridray-bench",
                        str(args.rounds), COPY, env=env)
    finally:
        down(state.name, home=home)

    mb = nbytes / 1e6
    plain = [p["seconds"] for p in res["plain"]]
    full = [f["seconds"] for f in res["full"]]
    same = [u["seconds"] for u in res["unchanged"]]
    plain_s, full_s, same_s = (statistics.median(x) for x in (plain, full, same))
    ratio = plain_s / full_s
    share = same_s / full_s
    rss = res["rss"] / 2**20
    secs = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    command = "python benchmarks/bench_sync.py" + "".join(
        f" --{k.replace('_', '-')} {v:g}" for k, v in vars(args).items()
        if v != parser.get_default(k))
    print(f"\n`{command}` — {args.files} Parquet files, {nbytes / 2**30:.2f} GiB, local fs -> "
          f"S3 server (moto) on 127.0.0.1, {os.cpu_count()} CPUs, object store "
          f"{args.object_store_mb} MB per node; median of {args.rounds} interleaved rounds\n")
    print("| measurement | seconds (median) | MB/s | each round (s) | vs target |")
    print("|---|---:|---:|---|---|")
    print(f"| plain `pyarrow.fs.copy_files` | {plain_s:.1f} | {mb / plain_s:.1f} | "
          f"{secs(plain)} | |")
    print(f"| hybridray sync, full ({res['full'][0]['parts']} parts, read back + verified, "
          f"committed) | {full_s:.1f} | {mb / full_s:.1f} | {secs(full)} | {ratio:.2f}x plain "
          f"(target >= 0.8x) {'PASS' if ratio >= 0.8 else 'FAIL'} |")
    print(f"| hybridray sync, nothing changed ({res['unchanged'][0]['outcome']}, "
          f"{res['unchanged'][0]['bytes_moved']} B moved) | {same_s:.2f} | - | {secs(same)} | "
          f"{100 * share:.1f}% of full (target < 5%) {'PASS' if share < 0.05 else 'FAIL'} |")
    print(f"| sync driver peak RSS (all rounds) | - | - | - | {rss:.0f} MiB (target < 1024 MiB) "
          f"{'PASS' if rss < 1024 else 'FAIL'}; plain copy process: "
          f"{max(p['rss'] for p in res['plain']) / 2**20:.0f} MiB |")
    phases = "; ".join(", ".join(f"{k} {v:.1f}s" for k, v in ph.items() if v >= 0.05)
                       for ph in res["phases"])
    print(f"\nfull sync phases per round: {phases}")
    print(f"exact command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
