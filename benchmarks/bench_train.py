"""hybridray train (2 Ray Train workers) against plain PyTorch DDP (2 processes), same run.

    python benchmarks/bench_train.py                       # target: ratio >= 0.95
    python benchmarks/bench_train.py --steps 300 --repeats 3 --cluster local

Both sides run the same worker loop (``hybridray.train.loop.run_loop``) on the same model,
data (the prepared stdlib corpus, read from the on-prem site's storage), seed, batch and
steps, with Gloo, fp32, one thread per worker. The hybridray side is ``hybridray.train.train``:
placement, residency check, Ray Train's worker group, metrics reporting, a checkpoint at the
end. The plain side is ``torch.multiprocessing`` + ``init_process_group("gloo")``, in a
session of its own like each node of the Ray cluster (Linux shares CPU between sessions
first, which matters on a busy machine). Start-up (cluster, worker processes, process group)
is excluded from both; what is compared is training throughput, in tokens/s:

* steady: the mean of the log windows after the first (step time only);
* end to end: every step since the first, with logging, evaluation and the checkpoint.

Without ``--cluster`` a cluster of its own (``bench-train``: one on-prem node of 2 CPUs) is
started in a temporary HYBRIDRAY_HOME and stopped at the end. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def config_overrides(args) -> list[str]:
    return [f"name=bench-{int(time.time())}", "train.workers=2", "train.cpus_per_worker=1",
            f"train.steps={args.steps}", f"train.micro_batch={args.micro_batch}",
            f"model.size={args.size}", f"model.block_size={args.block}",
            f"train.log_interval={args.log_interval}", f"train.eval_interval={args.steps}",
            f"train.checkpoint_interval={args.steps}", "train.eval_batches=2",
            "train.max_failures=0", "train.resume=never", "train.precision=fp32",
            "wan.mode=fp32", f"data.max_files={args.max_files}",
            "data.output=onprem:datasets/bench-train", "metrics.progress=false"]


def run_hybridray(cluster, args) -> dict:
    from hybridray.train.trainer import train

    r = train({}, cluster, overrides=config_overrides(args), progress=False)
    steady = r.history[1:] or r.history
    return {"steady": r.tokens_per_s, "e2e": r.history[-1]["loop_tokens_per_s"],
            "cpu": statistics.mean(m["tokens_per_cpu_s"] for m in steady),
            "loss": r.metrics["loss"], "sites": r.worker_sites}


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
        run_loop(spec, Record(rank, 2, rank, torch.device("cpu"), site="onprem"))
    finally:
        dist.destroy_process_group()


def run_plain(cluster, args) -> dict:
    """Plain DDP in a session of its own, as each node of a local Ray cluster is (the kernel
    shares CPU between sessions first: the driver's session must not be what is measured)."""
    import json
    import pickle
    import subprocess

    from hybridray.train.config import config_from_dict
    from hybridray.train.corpus import load_tokens, read_manifest
    from hybridray.train.model import GPTConfig

    config = config_from_dict({}, overrides=config_overrides(args))
    manifest = read_manifest(config.data.output, cluster.topology)
    tokens, _ = load_tokens(manifest.data, str(manifest.address), cluster.topology)
    spec = {"config": config.model_dump(mode="json"), "data_class": "restricted",
            "model_config": GPTConfig.named(config.model.size,
                                            **config.model.overrides()).model_dump(),
            "tokens": tokens}
    with tempfile.TemporaryDirectory(prefix="hr-bench-plain-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.pkl", Path(tmp) / "out.json"
        spec_path.write_bytes(pickle.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        subprocess.run([sys.executable, __file__, "--plain-run", str(spec_path), str(out_path)],
                       check=True, start_new_session=True, env=env)
        logs = [m for m in json.loads(out_path.read_text()) if m.get("tokens_per_s")]
    steady = logs[1:] or logs
    return {"steady": statistics.mean(m["tokens_per_s"] for m in steady),
            "e2e": logs[-1]["loop_tokens_per_s"],
            "cpu": statistics.mean(m["tokens_per_cpu_s"] for m in steady),
            "loss": logs[-1]["loss"]}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", help="use this running cluster (default: start one)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--log-interval", type=int, default=25)
    parser.add_argument("--max-files", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1, help="alternate runs; report medians")
    parser.add_argument("--plain-run", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_run:
        return plain_run(*args.plain_run)
    # hybridray clusters use Ray token auth, and Ray reads the mode once, when it is imported.
    os.environ.setdefault("RAY_AUTH_MODE", "token")

    from hybridray import cluster as lifecycle
    from hybridray.api import connect
    from hybridray.topology import load_topology

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
    try:
        cluster = connect(args.cluster or "bench-train")
        runs: dict[str, list[dict]] = {"hybridray": [], "plain": []}
        for _ in range(args.repeats):
            runs["hybridray"].append(run_hybridray(cluster, args))
            runs["plain"].append(run_plain(cluster, args))
    finally:
        if state is not None:
            import ray

            ray.shutdown()
            lifecycle.down(state.name, home=home)

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    cmd = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    print(f"\n`{cmd.strip()}` — {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {args.size} GPT (block {args.block}), 2 workers x "
          f"micro-batch {args.micro_batch}, {args.steps} steps, fp32, Gloo, median of "
          f"{args.repeats}\n")
    print("| run | steady tokens/s | end-to-end tokens/s | tokens per worker CPU-s | "
          "final loss |")
    print("|---|---:|---:|---:|---:|")
    for side, label in (("plain", "plain PyTorch DDP (torch.multiprocessing)"),
                        ("hybridray", "hybridray train (Ray Train, 2 workers, placed)")):
        print(f"| {label} | {med(side, 'steady'):,.0f} | {med(side, 'e2e'):,.0f} | "
              f"{med(side, 'cpu'):,.0f} | {med(side, 'loss'):.4f} |")
    steady = med("hybridray", "steady") / med("plain", "steady")
    e2e = med("hybridray", "e2e") / med("plain", "e2e")
    cpu = med("hybridray", "cpu") / med("plain", "cpu")
    print(f"| **ratio** (target >= 0.95) | **{steady:.3f}** | **{e2e:.3f}** | **{cpu:.3f}** "
          "| |")
    if args.repeats > 1:
        pairs = list(zip(runs["hybridray"], runs["plain"], strict=True))
        for key, what in (("steady", "steady tokens/s"), ("cpu", "tokens per CPU-s")):
            each = ", ".join(f"{h[key] / p[key]:.2f}" for h, p in pairs)
            print(f"\nratio of each repeat, {what}: {each}")
    print(f"\nworker sites (hybridray): {runs['hybridray'][0]['sites']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
