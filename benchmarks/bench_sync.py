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
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import Section, median, paired, repeats_table, verdict  # noqa: E402

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
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "benchmarks"))
from common import CpuGroup, ProcessTree, tree
from hybridray.cluster import load_state, ray_env
state = load_state(os.environ["HYBRIDRAY_CLUSTER"])
os.environ.update(ray_env(state))
import pyarrow.fs as pafs
import hybridray
from hybridray.storage import dataset_store, parse_address, sync_dataset
from hybridray.storage.fs import s3_filesystem
src_dir, endpoint, bucket, rounds, copy_code = sys.argv[1:6]
cluster = hybridray.connect(state.name)
topo = cluster.topology
s3 = s3_filesystem(endpoint)

def wipe(address):
    store = dataset_store(topo, parse_address(address, topo))
    store.delete(list(store.list()))

def gone(path):
    return s3.get_file_info(path).type == pafs.FileType.NotFound

sync_dataset("onprem:warmup", "cloud-a:warmup", cluster=cluster, data_class="internal")
nodes = [n.pid for n in state.nodes]
groups = {"plain": CpuGroup.create("plain"), "sync": CpuGroup.create("sync")}
out = {"plain": [], "full": [], "unchanged": [], "phases": []}
try:
    for r in range(int(rounds)):
        # the plain copy: a process of its own, all of its CPU and memory counted
        g = groups["plain"]
        procs = []
        side = ProcessTree(lambda: [p.pid for p in procs if p.poll() is None], group=g).start()
        proc = subprocess.Popen([sys.executable, "-c", copy_code, src_dir, endpoint,
                                 f"{bucket}/plain-{r}"], stdout=subprocess.PIPE, text=True,
                                preexec_fn=g.enter if g else None)
        procs.append(proc)
        stdout, _ = proc.communicate()
        side.stop()
        assert proc.returncode == 0, stdout
        rec = json.loads(stdout.strip().splitlines()[-1])
        rec.update(cpu_s=side.cpu_s, peak_bytes=side.peak_bytes)
        out["plain"].append(rec)
        s3.delete_dir(f"{bucket}/plain-{r}")          # where the plain copy went
        assert gone(f"{bucket}/plain-{r}"), "the plain copy was not removed"
        # the sync: this driver and every process of the cluster (the bytes flow there)
        g = groups["sync"]
        if g:
            g.adopt(tree(nodes))
        side = ProcessTree(lambda: nodes, group=g, own=True).start()
        started = time.perf_counter()
        full = sync_dataset("onprem:data", f"cloud-a:bench-{r}", cluster=cluster,
                            data_class="internal")
        seconds = time.perf_counter() - started
        side.stop()
        out["full"].append({"seconds": seconds, "parts": full.parts_written,
                            "bytes_moved": full.bytes_moved, "cpu_s": side.cpu_s,
                            "peak_bytes": side.peak_bytes})
        out["phases"].append(full.phases)
        started = time.perf_counter()
        same = sync_dataset("onprem:data", f"cloud-a:bench-{r}", cluster=cluster,
                            data_class="internal")
        out["unchanged"].append({"seconds": time.perf_counter() - started,
                                 "outcome": same.outcome, "bytes_moved": same.bytes_moved})
        wipe(f"cloud-a:bench-{r}")
finally:
    for g in groups.values():
        if g:
            g.remove()
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


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of plain copy, full sync, unchanged sync")
    parser.add_argument("--object-store-mb", type=int, default=100,
                        help="object store of the onprem and cloud-a nodes (local.yaml: 100)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    section = Section(__file__, argv)

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
    ratio = median(paired(plain, full))            # throughput ratio = time plain / sync
    share = median(paired(same, full))
    rows = [("plain `pyarrow.fs.copy_files`: seconds", plain, "{:.1f}"),
            ("hybridray sync, full: seconds", full, "{:.1f}"),
            ("**throughput sync / plain** (paired)", paired(plain, full), "{:.2f}"),
            ("hybridray sync, nothing changed: seconds", same, "{:.2f}"),
            ("**nothing changed / full** (paired)", paired(same, full), "{:.3f}"),
            ("plain: CPU s, its process", [p["cpu_s"] for p in res["plain"]], "{:.1f}"),
            ("sync: CPU s, driver + every cluster process",
             [f["cpu_s"] for f in res["full"]], "{:.1f}"),
            ("plain: peak memory, its process (PSS MiB)",
             [p["peak_bytes"] / 2**20 for p in res["plain"]], "{:.0f}"),
            ("sync: peak memory, driver + every cluster process (PSS MiB)",
             [f["peak_bytes"] / 2**20 for f in res["full"]], "{:.0f}")]
    print(section.header(
        f"{args.files} Parquet files, {nbytes / 2**30:.2f} GiB ({mb:,.0f} MB), local fs -> S3 "
        f"server (moto) on 127.0.0.1, object store {args.object_store_mb} MB per node, "
        f"{args.rounds} interleaved rounds (plain copy, full sync, unchanged sync); the full "
        f"sync moves {res['full'][0]['parts']} parts, each read back and verified, then "
        "commits"))
    print(repeats_table(rows, "measure (per round)"))
    rss = res["rss"] / 2**20
    print(f"\nsync throughput {ratio:.2f}x plain (target >= 0.8x): {verdict(ratio, 0.8)}; "
          f"unchanged re-sync {100 * share:.1f}% of a full one (target < 5%): "
          f"{verdict(share, 0.05, at_least=False)}; sync driver peak RSS {rss:.0f} MiB "
          f"(target < 1024 MiB): {verdict(rss, 1024, at_least=False)}")
    phases = "; ".join(", ".join(f"{k} {v:.1f}s" for k, v in ph.items() if v >= 0.05)
                       for ph in res["phases"])
    print(f"\nfull sync phases per round: {phases}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
