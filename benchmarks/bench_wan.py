"""WAN-aware training measured in time: one worker per site over a link shaped to 50 Mbit/s.

    flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_wan.py --repeats 2  # as root
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
end, i.e. at equal tokens, the bytes per step the hooks put into collectives across the sites
(the ring model) and the bytes the shaped link really carried per step (its tc counters, both
directions). Runs of the modes alternate, so every mode sees the same machine load; each
ratio to plain DDP is paired (per repeat). Then the link itself: a raw TCP transfer on-prem ->
cloud-a (the best the link allows) and ``hybridray sync`` of a dataset over it, each against
the shaped rate. Prints the tables in ``benchmarks/common.py``'s format: the command, the
commit, the load before and after, every repeat, the median and the spread.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import Section, paired, repeats_table  # noqa: E402

LOCAL_YAML = ROOT / "clusters" / "local.yaml"
MODES = ("fp32", "bf16", "powersgd", "diloco")
LABELS = {"fp32": "plain DDP (fp32 all-reduce)", "bf16": "DDP + bf16 compression hook",
          "powersgd": "DDP + PowerSGD hook", "diloco": "DiLoCo (outer step every N)",
          "localsgd": "local SGD (average every N)", "fp16": "DDP + fp16 compression hook"}


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mbps", type=float, default=50.0,
                   help="rate of the onprem <-> cloud-a link, each way (default 50)")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--sync-every", type=int, default=8)
    p.add_argument("--max-files", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--sync-mib", type=int, default=24)
    p.add_argument("--inner-train", nargs=2, metavar=("CLUSTER", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--inner-sync", metavar="CLUSTER", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def link_bytes(rec) -> int:
    """Bytes the onprem <-> cloud-a link carried so far, both directions (tc counters)."""
    from hybridray.cluster import netns

    return (netns.class_bytes(rec, "onprem", "cloud-a")
            + netns.class_bytes(rec, "cloud-a", "onprem"))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
    section = Section(__file__, argv)
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
                before = link_bytes(rec)
                run = on_head(state, ["--inner-train", state.name, mode, *passthrough], env)
                if "failed" not in run:
                    run["link_bytes_per_step"] = (link_bytes(rec) - before) / run["steps"]
                runs[mode].append(run)
            sync = on_head(state, ["--inner-sync", state.name, f"--sync-mib={args.sync_mib}"],
                           env)
            if "failed" not in sync:
                syncs.append(sync)
    finally:
        down(state.name, home=home)
    print(report(section, args, modes, runs, tcp, syncs, rec))
    return 0


def report(section: Section, args, modes: list[str], runs: dict[str, list[dict]],
           tcp: list[float], syncs: list[dict], rec) -> str:
    nan = float("nan")

    def values(mode: str, key: str, scale: float = 1.0) -> list[float]:
        return [r[key] / scale if "failed" not in r and r.get(key) is not None else nan
                for r in runs[mode]]

    what = (f"Namespace hosts (clusters/local.yaml, cloud-b left out), onprem <-> cloud-a "
            f"shaped to {args.mbps:g} Mbit/s each way by tc HTB"
            f"{'' if rec.netem else ' (no netem qdisc here, so no added latency)'}; small GPT "
            f"({args.block}-token blocks), 2 workers of 2 CPUs (one onprem, one at cloud-a) x "
            f"micro-batch {args.micro_batch}, {args.steps} steps each, so every mode trains on "
            f"the same tokens; PowerSGD rank 2 from step 4, DiLoCo outer step every "
            f"{args.sync_every}; {args.repeats} interleaved repeats")
    rows: list[tuple[str, list[float], str]] = []
    for mode in modes:
        rows.append((f"{LABELS.get(mode, mode)}: tokens/s", values(mode, "tokens_per_s"),
                     "{:,.0f}"))
        if mode != "fp32" and "fp32" in modes:
            rows.append(("  ÷ plain DDP (paired)", paired(values(mode, "tokens_per_s"),
                                                          values("fp32", "tokens_per_s")),
                         "{:.2f}x"))
    for mode in modes:
        rows.append((f"{LABELS.get(mode, mode)}: eval loss at the end",
                     values(mode, "eval_loss"), "{:.4f}"))
    for mode in modes:
        rows.append((f"{LABELS.get(mode, mode)}: MB/step over the link (tc)",
                     values(mode, "link_bytes_per_step", 1e6), "{:.2f}"))
        rows.append(("  MB/step in collectives across sites (ring model)",
                     values(mode, "cross_site_bytes_per_step", 1e6), "{:.2f}"))
    out = [section.header(what), repeats_table(rows, "measure (per repeat)"), ""]
    for mode in modes:
        for i, r in enumerate(runs[mode]):
            if "failed" in r:
                out.append(f"- {mode}, repeat {i + 1} failed: {r['failed']}")
    sites = {m: next((r["sites"] for r in runs[m] if "failed" not in r), None) for m in modes}
    out.append(f"\nWorker sites per mode: {sites}\n")
    sync_rates = [s["mbit_per_s"] for s in syncs]
    link = [
        ("raw TCP onprem -> cloud-a, 16 MiB: Mbit/s", tcp, "{:.1f}"),
        ("  ÷ link rate", [x / args.mbps for x in tcp], "{:.2f}x"),
        (f"hybridray sync onprem -> cloud-a, {args.sync_mib} MiB: Mbit/s", sync_rates,
         "{:.1f}"),
        ("  ÷ link rate", [x / args.mbps for x in sync_rates], "{:.2f}x"),
    ]
    out += [section.header(f"The shaped link itself ({args.mbps:g} Mbit/s): a raw TCP "
                           "transfer and hybridray sync of random (incompressible) Parquet, "
                           "one per repeat"),
            repeats_table(link, "measure (per repeat)")]
    if len(syncs) < args.repeats:
        out.append(f"\n{args.repeats - len(syncs)} sync run(s) failed (see stderr)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
