"""WAN-aware training measured in time: one worker per site over a link shaped to 50 Mbit/s.

    sudo python benchmarks/bench_wan.py                         # 2 repeats of each mode
    sudo python benchmarks/bench_wan.py --repeats 3 --steps 64 --modes fp32,bf16,powersgd,diloco

Needs root: it starts ``clusters/local.yaml`` as namespace hosts (``--hosts netns``, cloud-b
left out), with the on-prem <-> cloud-a link shaped to ``--mbps`` in both directions by tc,
then trains the same model, data, seed, batch and steps with two workers, one on-prem and one
at cloud-a, so every gradient exchange crosses the shaped link:

* ``fp32``: plain DDP all-reduce, every step (what a user runs without hybridray's WAN modes);
* ``bf16``: DDP with the bf16 compression hook;
* ``powersgd``: DDP with the PowerSGD hook (rank 2, plain all-reduce for the first steps);
* ``diloco``: local steps, an outer Nesterov step every ``--sync-every`` steps.

Each run reports tokens/s (steady: the log windows after the first) and the eval loss at the
end, i.e. at equal tokens. Runs of the modes alternate, so every mode sees the same machine
load. Then the link itself: a raw TCP transfer on-prem -> cloud-a (the best the link allows)
and ``hybridray sync`` of a dataset over it, each against the shaped rate. Prints one
Markdown table with the command, the commit, the load before and after, every repeat, the
median and the spread (max - min).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOCAL_YAML = ROOT / "clusters" / "local.yaml"
MODES = ("fp32", "bf16", "powersgd", "diloco")


def train_overrides(args, mode: str) -> list[str]:
    return [f"name=wan-{mode}-{int(time.time())}", "model.size=small",
            f"model.block_size={args.block}", "train.workers=2", "train.cpus_per_worker=2",
            "train.preference=onprem-first", f"train.steps={args.steps}",
            f"train.micro_batch={args.micro_batch}", f"train.log_interval={args.steps // 4}",
            f"train.eval_interval={args.steps}", f"train.checkpoint_interval={args.steps}",
            "train.eval_batches=4", "train.warmup_steps=4", "train.max_failures=0",
            "train.resume=never", "train.precision=fp32", f"wan.mode={mode}",
            "wan.powersgd_start=4", "wan.powersgd_rank=2", f"wan.sync_every={args.sync_every}",
            "data.data_class=confidential", "data.output=onprem:datasets/bench-wan",
            f"data.max_files={args.max_files}", "metrics.progress=false"]


# ---- run on the head host (inside its namespace) ------------------------------------------

def inner_train(cluster_name: str, mode: str, args) -> dict:
    import hybridray
    from hybridray.train.trainer import train

    cluster = hybridray.connect(cluster_name)
    r = train({}, cluster, overrides=train_overrides(args, mode), progress=False)
    steady = r.history[1:] or r.history
    return {"mode": mode, "tokens_per_s": statistics.mean(h["tokens_per_s"] for h in steady),
            "eval_loss": r.final_eval_loss, "sites": r.worker_sites, "steps": r.steps,
            "cross_site_bytes_per_step": statistics.mean(
                h["cross_site_bytes_per_step"] for h in steady),
            "elapsed_s": r.elapsed_s}


def inner_sync(cluster_name: str, mib: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import hybridray
    from hybridray.storage import sync_dataset

    cluster = hybridray.connect(cluster_name)
    root = Path(cluster.topology.sites["onprem"].storage.path) / f"bench-sync-{time.time_ns()}"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = mib * 2**20 // 8 // 4  # random float64 does not compress: bytes on the wire = size
    for i in range(4):
        pq.write_table(pa.table({"x": rng.random(rows)}), root / f"part-{i}.parquet",
                       compression="none")
    r = sync_dataset(f"onprem:{root.name}", f"cloud-a:{root.name}", cluster=cluster,
                     data_class="confidential")
    return {"bytes": r.bytes_moved, "seconds": r.seconds,
            "mbit_per_s": r.bytes_moved * 8 / 1e6 / r.seconds, "phases": r.phases}


# ---- the benchmark, from the root namespace -----------------------------------------------

def on_head(state, argv: list[str], env: dict) -> dict:
    from hybridray.cluster.nshosts import driver_argv

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    proc = subprocess.run(driver_argv(state, [sys.executable, __file__, *argv, "--out", out]),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:  # reported in the table, the other runs go on
        last = [line for line in proc.stderr.splitlines() if "Error" in line][-1:] or ["?"]
        print(f"{' '.join(argv)} failed:\n{proc.stderr[-4000:]}", file=sys.stderr)
        return {"failed": last[0][-300:]}
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    return data


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "?"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbps", type=float, default=50.0)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--sync-every", type=int, default=8)
    parser.add_argument("--max-files", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--sync-mib", type=int, default=24)
    parser.add_argument("--inner-train", nargs=2, metavar=("CLUSTER", "MODE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--inner-sync", metavar="CLUSTER", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner_train or args.inner_sync:
        data = (inner_train(*args.inner_train, args) if args.inner_train
                else inner_sync(args.inner_sync, args.sync_mib))
        Path(args.out).write_text(json.dumps(data, default=str))
        return 0

    from hybridray.cluster import down, netns, ray_env, up
    from hybridray.topology import load_topology

    reason = netns.unsupported_reason()
    if reason:
        print(f"bench_wan: {reason}", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    cmd = "python benchmarks/bench_wan.py " + " ".join(argv if argv is not None
                                                       else sys.argv[1:])
    load_before = load()
    home = tempfile.mkdtemp(prefix="hr-bench-wan-")
    os.environ["HYBRIDRAY_HOME"] = home
    overrides = ["name=bench-wan", "sites.cloud-b.pools[0].count=0",
                 f"sites.onprem.links.cloud-a.bandwidth_mbps={args.mbps:g}",
                 f"sites.cloud-a.links.onprem.bandwidth_mbps={args.mbps:g}"]
    topology = load_topology(LOCAL_YAML, overrides)
    lines: list[str] = []
    state = up(topology, source_file=LOCAL_YAML, overrides=overrides, home=home,
               hosts="netns", timeout=240, progress=lines.append)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    tcp: list[float] = []
    syncs: list[dict] = []
    try:
        env = {**os.environ, **ray_env(state), "PYTHONPATH": str(ROOT)}
        env.pop("RAY_AUTH_TOKEN", None)
        rec = netns.NetRecord.from_json(state.netns)
        src, dst = rec.site_hosts("onprem")[-1], rec.site_hosts("cloud-a")[0]
        passthrough = [f"--steps={args.steps}", f"--micro-batch={args.micro_batch}",
                       f"--block={args.block}", f"--sync-every={args.sync_every}",
                       f"--max-files={args.max_files}"]
        for _ in range(args.repeats):
            tcp.append(netns.transfer(src.netns, dst.netns, dst.ip, 16))
            for mode in modes:
                runs[mode].append(on_head(state, ["--inner-train", state.name, mode,
                                                  *passthrough], env))
            sync = on_head(state, ["--inner-sync", state.name, f"--sync-mib={args.sync_mib}"],
                           env)
            if "failed" not in sync:
                syncs.append(sync)
    finally:
        down(state.name, home=home)
    load_after = load()

    def spread(values: list[float]) -> float:
        return max(values) - min(values)

    print(f"\n`sudo {cmd.strip()}` — commit {commit()}, {os.cpu_count()} CPUs, load "
          f"{load_before} before / {load_after} after; namespace hosts, onprem <-> cloud-a "
          f"shaped to {args.mbps:g} Mbit/s each way (tc HTB"
          f"{'' if rec.netem else '; no netem here, so no added latency'}); small GPT "
          f"({args.block}-token blocks), 2 workers (onprem, cloud-a) x micro-batch "
          f"{args.micro_batch}, {args.steps} steps = equal tokens; {args.repeats} repeats\n")
    print("| run | each repeat: tokens/s | median tokens/s | spread | vs plain DDP | "
          "eval loss (median) | WAN bytes/step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base = statistics.median(r["tokens_per_s"] for r in runs[modes[0]]
                             if "failed" not in r) if modes[0] == "fp32" else 0
    for mode in modes:
        failed = [r["failed"] for r in runs[mode] if "failed" in r]
        runs[mode] = [r for r in runs[mode] if "failed" not in r]
        if not runs[mode]:
            print(f"| wan.mode={mode} | failed: {failed[0][:160]} | | | | | |")
            continue
        tps = [r["tokens_per_s"] for r in runs[mode]]
        loss = statistics.median(r["eval_loss"] for r in runs[mode])
        wan_bytes = statistics.median(r["cross_site_bytes_per_step"] for r in runs[mode])
        label = "plain DDP (fp32 all-reduce)" if mode == "fp32" else f"wan.mode={mode}"
        print(f"| {label} | {', '.join(f'{x:,.0f}' for x in tps)} | "
              f"{statistics.median(tps):,.0f} | {spread(tps):,.0f} | "
              f"{statistics.median(tps) / base if base else float('nan'):.2f}x | {loss:.4f} | "
              f"{wan_bytes / 1e6:.2f} MB |" + (f" ({len(failed)} failed)" if failed else ""))
    sync_rates = [s["mbit_per_s"] for s in syncs] or [float("nan")]
    print(f"| raw TCP onprem -> cloud-a (16 MiB) | {', '.join(f'{x:.1f}' for x in tcp)} "
          f"Mbit/s | {statistics.median(tcp):.1f} Mbit/s | {spread(tcp):.1f} | "
          f"{statistics.median(tcp) / args.mbps:.2f}x of the link | | |")
    print(f"| hybridray sync onprem -> cloud-a ({args.sync_mib} MiB) | "
          f"{', '.join(f'{x:.1f}' for x in sync_rates)} Mbit/s | "
          f"{statistics.median(sync_rates):.1f} Mbit/s | {spread(sync_rates):.1f} | "
          f"{statistics.median(sync_rates) / args.mbps:.2f}x of the link | | |")
    sites = {m: runs[m][0]["sites"] for m in modes if runs[m]}
    print(f"\nworker sites: {sites}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
