"""hybridray train (2 Ray Train workers) against plain PyTorch DDP (2 processes), interleaved.

    python benchmarks/bench_train.py                  # 7 repeats of each; target: >= 0.95x
    python benchmarks/bench_train.py --repeats 9 --steps 400 --cluster local

Both sides run the same worker loop (``hybridray.train.loop.run_loop``) on the same model,
data (the prepared stdlib corpus, read from the on-prem site's storage), seed, batch, steps
and checkpoints, with Gloo, fp32, one thread per worker. The hybridray side is
``hybridray.train.train``: placement, residency check, Ray Train's worker group, progress to
the driver, every checkpoint uploaded to the site's storage and committed by Ray Train. The
plain side is what a user would run instead: ``torch.multiprocessing`` +
``init_process_group("gloo")``, the same loop saving the same checkpoints to local disk, in a
session of its own like each node of the Ray cluster (Linux shares CPU between sessions
first, which matters on a busy machine). Repeats alternate which side goes first.

Measured per side and repeat (tokens/s):

* steady: the mean of the log windows after the first (step time only);
* end to end: from the first step until the last checkpoint is saved (and, for hybridray,
  uploaded and committed), every log window, evaluation and checkpoint included;
* whole call: from the call (``train()`` / launching the processes) to its return, start-up
  of the worker processes included (the Ray cluster is up before: ``bench_up_down.py``);
* tokens per CPU-second of every process of the side over the whole call: for hybridray the
  driver and every process of the cluster (GCS, raylet, agents, Train controller, workers,
  progress actor); for plain the launcher, its two workers and its manager process;
* peak memory: the sum of PSS over the same processes.

Ratios are the median of the per-repeat (paired) ratios hybridray / plain.

Without ``--cluster`` a cluster of its own (``bench-train``: one on-prem node of 2 CPUs) is
started in a temporary HYBRIDRAY_HOME and stopped at the end. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import (  # noqa: E402
    CpuGroup,
    ProcessTree,
    Section,
    median,
    paired,
    repeats_table,
    tree,
    verdict,
)

TARGET = 0.95
# Seconds between memory samples. Reading PSS walks every process's page tables, from this
# process: at 2 s it cost about 0.03 of a core beside Ray's ~20 processes (py-spy on this
# driver: 39 of its 42 samples), CPU taken from the hybridray side's workers and counted
# in its CPU; the plain side's three processes cost almost nothing to read.
PSS_S = 5.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cluster", help="use this running cluster (default: start one)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--size", default="tiny")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--log-interval", type=int, default=25)
    p.add_argument("--checkpoint-interval", type=int, default=100,
                   help="steps between checkpoints (both sides save each; default 100)")
    p.add_argument("--max-files", type=int, default=200)
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats of each side")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more config override of the hybridray side (e.g. "
                        "train.worker_niceness=15, Ray's own worker priority); repeatable")
    p.add_argument("--plain-run", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return p


def config_overrides(args) -> list[str]:
    return [f"name=bench-{int(time.time() * 1000)}", "train.workers=2",
            "train.cpus_per_worker=1", f"train.steps={args.steps}",
            f"train.micro_batch={args.micro_batch}", f"model.size={args.size}",
            f"model.block_size={args.block}", f"train.log_interval={args.log_interval}",
            f"train.eval_interval={args.steps}",
            f"train.checkpoint_interval={args.checkpoint_interval}", "train.eval_batches=2",
            "train.max_failures=0", "train.resume=never", "train.precision=fp32",
            "wan.mode=fp32", f"data.max_files={args.max_files}",
            "data.output=onprem:datasets/bench-train", "metrics.progress=false", *args.set]


def _steady(logs: list[dict]) -> tuple[float, float]:
    logs = [m for m in logs if m.get("tokens_per_s")]
    steady = logs[1:] or logs          # the first window holds the warm-up
    return (statistics.mean(m["tokens_per_s"] for m in steady),
            statistics.mean(m["tokens_per_cpu_s"] for m in steady))


GROUPS: dict[str, CpuGroup | None] = {}


def run_hybridray(cluster, state, args) -> dict:
    from hybridray.train.trainer import train

    group = GROUPS.get("hybridray")
    if group:    # every process of the cluster; the workers it starts inherit the group
        group.adopt(tree(n.pid for n in state.nodes))
    side = ProcessTree(lambda: [n.pid for n in state.nodes], group=group, own=True,
                       interval=PSS_S).start()
    started = time.perf_counter()
    r = train({}, cluster, overrides=config_overrides(args), progress=False)
    wall = time.perf_counter() - started
    side.stop()
    steady, worker_cpu = _steady(r.history)
    tokens = r.steps * args.micro_batch * 2 * args.block
    return {"steady": steady, "e2e": r.end_to_end_tokens_per_s, "wall": tokens / wall,
            "cpu": tokens / side.cpu_s, "worker_cpu": worker_cpu,
            "mem": side.peak_bytes / 2**20, "loss": r.metrics["loss"],
            "sites": r.worker_sites}


def _plain_worker(rank: int, port: int, spec: dict, out) -> None:
    import torch
    import torch.distributed as dist

    from hybridray.train.loop import Session, run_loop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    class Record(Session):
        def report(self, metrics, checkpoint_dir, step):
            if rank == 0:
                out.append(dict(metrics))

    try:
        summary = run_loop(spec, Record(rank, 2, rank, torch.device("cpu"), site="onprem"))
        if rank == 0:
            out.append({"summary": summary.get("end_to_end_tokens_per_s")})
    finally:
        dist.destroy_process_group()


def plain_spec(cluster, overrides: list[str]) -> dict:
    """The worker loop's spec for a run outside Ray, with these config overrides."""
    from hybridray.train.config import config_from_dict
    from hybridray.train.corpus import load_tokens, read_manifest
    from hybridray.train.model import GPTConfig

    config = config_from_dict({}, overrides=overrides)
    manifest = read_manifest(config.data.output, cluster.topology)
    tokens, _ = load_tokens(manifest.data, str(manifest.address), cluster.topology)
    return {"config": config.model_dump(mode="json"), "data_class": "restricted",
            "model_config": GPTConfig.named(config.model.size,
                                            **config.model.overrides()).model_dump(),
            "tokens": tokens}


def run_plain(spec: dict, args) -> dict:
    """Plain DDP in a session of its own, as each node of a local Ray cluster is (the kernel
    shares CPU between sessions first: the driver's session must not be what is measured)."""
    import json
    import pickle

    with tempfile.TemporaryDirectory(prefix="hr-bench-plain-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.pkl", Path(tmp) / "out.json"
        spec_path.write_bytes(pickle.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        group = GROUPS.get("plain")
        procs: list[subprocess.Popen] = []
        side = ProcessTree(lambda: [p.pid for p in procs if p.poll() is None],
                           group=group, interval=PSS_S).start()
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--plain-run", str(spec_path),
                                 str(out_path)], start_new_session=True, env=env,
                                preexec_fn=group.enter if group else None)
        procs.append(proc)
        if proc.wait() != 0:
            raise RuntimeError(f"the plain run failed (exit {proc.returncode})")
        wall = time.perf_counter() - started
        side.stop()
        records = json.loads(out_path.read_text())
    logs = [m for m in records if m.get("tokens_per_s")]
    steady, worker_cpu = _steady(logs)
    tokens = logs[-1]["step"] * args.micro_batch * 2 * args.block
    return {"steady": steady, "e2e": records[-1]["summary"], "wall": tokens / wall,
            "cpu": tokens / side.cpu_s, "worker_cpu": worker_cpu,
            "mem": side.peak_bytes / 2**20, "loss": logs[-1]["loss"]}


def plain_run(spec_path: str, out_path: str) -> int:
    """``--plain-run``: two processes, ``init_process_group("gloo")``, the same loop."""
    import json
    import pickle

    import torch.multiprocessing as mp

    spec = pickle.loads(Path(spec_path).read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # What torchrun does (and Ray does for a 1-CPU worker): one OpenMP thread per process.
    os.environ["OMP_NUM_THREADS"] = "1"
    with mp.get_context("spawn").Manager() as manager:
        out = manager.list()
        mp.start_processes(_plain_worker, args=(port, spec, out), nprocs=2,
                           start_method="spawn")
        Path(out_path).write_text(json.dumps(list(out), default=str))
    return 0


ROWS = (("steady", "steady tokens/s", "{:,.0f}"),
        ("e2e", "end to end tokens/s (first step to last checkpoint committed)", "{:,.0f}"),
        ("wall", "whole call tokens/s (worker start-up included)", "{:,.0f}"),
        ("cpu", "tokens per CPU-s, every process of the side", "{:,.0f}"),
        ("worker_cpu", "tokens per CPU-s, training workers only", "{:,.0f}"),
        ("mem", "peak memory, every process of the side (PSS, MiB)", "{:,.0f}"),
        ("loss", "final training loss", "{:.4f}"))


def report(section: Section, runs: dict[str, list[dict]], args) -> str:
    rows = []
    for key, label, fmt in ROWS:
        rows.append((f"{label}: plain", [r[key] for r in runs["plain"]], fmt))
        rows.append((f"{label}: hybridray", [r[key] for r in runs["hybridray"]], fmt))
        if key != "loss":
            rows.append((f"**{label}: ratio** (paired)",
                         paired([r[key] for r in runs["hybridray"]],
                                [r[key] for r in runs["plain"]]), "{:.3f}"))
    what = (f"hybridray train (Ray Train, 2 workers of 1 CPU, placed; sites "
            f"{', '.join(runs['hybridray'][0]['sites'])}) vs plain PyTorch DDP "
            f"(torch.multiprocessing), {args.size} GPT (block {args.block}), 2 workers x "
            f"micro-batch {args.micro_batch}, {args.steps} steps, a checkpoint every "
            f"{args.checkpoint_interval}, fp32, Gloo, {args.repeats} interleaved repeats"
            + (f"; hybridray side also given {', '.join(args.set)}" if args.set else ""))
    how = ("CPU from a cpuacct cgroup per side (exact, exited processes included)"
           if GROUPS.get("plain") else f"CPU from /proc, sampled every {PSS_S:g} s (no cgroup "
                                       "here)")
    how += f"; memory (PSS) sampled every {PSS_S:g} s"
    out = [section.header(f"{what}; {how}"), repeats_table(rows, "measure (per repeat)"), ""]
    for key, label in (("steady", "steady"), ("e2e", "end to end with checkpoints")):
        ratio = median(paired([r[key] for r in runs["hybridray"]],
                              [r[key] for r in runs["plain"]]))
        out.append(f"{label}: median paired ratio {ratio:.3f} (target >= {TARGET}): "
                   f"{verdict(ratio, TARGET)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.plain_run:
        return plain_run(*args.plain_run)
    # hybridray clusters use Ray token auth, and Ray reads the mode once, when it is imported.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from hybridray import cluster as lifecycle
    from hybridray.api import connect
    from hybridray.topology import load_topology

    section = Section(__file__, argv)
    GROUPS.update(hybridray=CpuGroup.create("hybridray"), plain=CpuGroup.create("plain"))
    state = home = None
    if args.cluster is None:
        home = tempfile.mkdtemp(prefix="hr-bench-train-")
        os.environ["HYBRIDRAY_HOME"] = home
        overrides = ["name=bench-train", "sites.cloud-a.pools[0].count=0",
                     "sites.cloud-b.pools[0].count=0"]
        state = lifecycle.up(load_topology(ROOT / "clusters/local.yaml", overrides),
                             source_file=ROOT / "clusters/local.yaml", overrides=overrides,
                             home=home, dashboard=False, timeout=180)
        os.environ.update(lifecycle.ray_env(state))
    else:
        state = lifecycle.load_state(args.cluster)
    try:
        cluster = connect(state.name)
        runs: dict[str, list[dict]] = {"hybridray": [], "plain": []}
        run_hybridray(cluster, state, args)    # warm-up, not counted: prepares the corpus
        spec = plain_spec(cluster, config_overrides(args))
        for i in range(args.repeats):
            order = ("plain", "hybridray") if i % 2 == 0 else ("hybridray", "plain")
            for side in order:
                r = run_plain(spec, args) if side == "plain" else \
                    run_hybridray(cluster, state, args)
                runs[side].append(r)
                print(f"repeat {i + 1}/{args.repeats} {side:<9} steady {r['steady']:,.0f} "
                      f"e2e {r['e2e']:,.0f} wall {r['wall']:,.0f} tokens/s, "
                      f"{r['cpu']:,.0f} tokens/CPU-s", file=sys.stderr, flush=True)
    finally:
        if home is not None:
            import ray

            ray.shutdown()
            lifecycle.down(state.name, home=home)
        for group in GROUPS.values():
            if group:
                group.remove()
    print(report(section, runs, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
