"""GPU: GPT-2-124M shape through hybridray train (bf16, compile) vs the same loop outside Ray.

    python benchmarks/bench_gpu.py                    # one CUDA GPU; 3 interleaved repeats
    python benchmarks/bench_gpu.py --repeats 1 --steps 60

Needs one CUDA GPU (bf16 tensor cores). A cluster of its own (``bench-gpu``: one on-prem
node with the GPU) is started in a temporary HYBRIDRAY_HOME and stopped at the end. Three
runs per repeat, taken in turn: ``hybridray train`` (Ray Train, 1 worker of 1 GPU, placed by
policy, data read from the site's storage, every checkpoint committed) in bf16 +
``torch.compile``; the same worker loop (``hybridray.train.loop.run_loop``: model, data,
seed, batch, steps, checkpoints) in a plain process outside Ray, bf16 + compile; and that
plain process in fp32 (TF32 matmuls allowed, as the loop sets) + compile. MFU counts
6·N + attention FLOPs per token against the GPU's dense peak (``GPU_PEAK_FLOPS``: bf16
tensor cores for bf16, fp32 for fp32). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import _steady, config_overrides, plain_spec  # noqa: E402
from common import Section, median, paired, repeats_table  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--plain-run", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return p


def overrides(args, precision: str) -> list[str]:
    """bench_train's run, reshaped for one GPU: the later overrides win."""
    base = argparse.Namespace(steps=args.steps, micro_batch=args.micro_batch, size="gpt2-124m",
                              block=args.block, log_interval=25, checkpoint_interval=args.steps,
                              max_files=300, set=[])
    return [*config_overrides(base), "train.workers=1", "train.gpus_per_worker=1",
            "train.cpus_per_worker=4", f"train.precision={precision}", "train.compile=true",
            "data.output=onprem:datasets/bench-gpu"]


def run_hybridray(cluster, args) -> dict:
    from hybridray.train.trainer import train

    started = time.perf_counter()
    r = train({}, cluster, overrides=overrides(args, "bf16"), progress=False)
    wall = time.perf_counter() - started
    steady, _ = _steady(r.history)
    return {"steady": steady, "e2e": r.end_to_end_tokens_per_s, "mfu": _mfu(r.history),
            "wall": r.steps * args.micro_batch * args.block / wall, "loss": r.metrics["loss"]}


def _mfu(logs: list[dict]) -> float:
    logs = [m for m in logs if m.get("mfu")]
    steady = logs[1:] or logs
    return sum(m["mfu"] for m in steady) / len(steady)


def run_plain(spec: dict, args) -> dict:
    """The loop in a process of its own (no Ray in it), as a user would run it."""
    with tempfile.TemporaryDirectory(prefix="hr-bench-gpu-plain-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.pkl", Path(tmp) / "out.json"
        spec_path.write_bytes(pickle.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--plain-run", str(spec_path),
                        str(out_path)], env=env, cwd=tmp, check=True)
        wall = time.perf_counter() - started
        out = json.loads(out_path.read_text())
    steady, _ = _steady(out["logs"])
    return {"steady": steady, "e2e": out["e2e"], "mfu": _mfu(out["logs"]),
            "wall": args.steps * args.micro_batch * args.block / wall,
            "loss": out["logs"][-1]["loss"]}


def plain_run(spec_path: str, out_path: str) -> int:
    import torch
    import torch.distributed as dist

    from hybridray.train.loop import Session, run_loop

    spec = pickle.loads(Path(spec_path).read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda:0")
    dist.init_process_group("nccl", rank=0, world_size=1)
    logs: list[dict] = []

    class Record(Session):
        def report(self, metrics, checkpoint_dir, step):
            logs.append(dict(metrics))

    try:
        summary = run_loop(spec, Record(0, 1, 0, device, site="onprem"))
    finally:
        dist.destroy_process_group()
    Path(out_path).write_text(json.dumps({"logs": logs, "e2e": summary.get(
        "end_to_end_tokens_per_s")}, default=str))
    return 0


ROWS = (("steady", "steady tokens/s", "{:,.0f}"),
        ("mfu", "MFU, steady (fraction of dense peak)", "{:.3f}"),
        ("e2e", "end to end tokens/s (first step to last checkpoint)", "{:,.0f}"),
        ("wall", "whole call tokens/s (start-up and compile included)", "{:,.0f}"),
        ("loss", "final training loss", "{:.4f}"))
SIDES = (("hybridray", "hybridray train bf16+compile"),
         ("plain", "same loop outside Ray, bf16+compile"),
         ("fp32", "same loop outside Ray, fp32+compile"))


def report(section: Section, runs: dict[str, list[dict]], args, gpu: str) -> str:
    rows = []
    for key, label, fmt in ROWS:
        for side, name in SIDES:
            rows.append((f"{label}: {name}", [r[key] for r in runs[side]], fmt))
    for key, label in (("steady", "steady"), ("e2e", "end to end")):
        rows.append((f"**{label}: hybridray / outside Ray** (paired)",
                     paired([r[key] for r in runs["hybridray"]],
                            [r[key] for r in runs["plain"]]), "{:.3f}"))
    rows.append(("**steady: bf16 / fp32, outside Ray** (paired)",
                 paired([r["steady"] for r in runs["plain"]],
                        [r["steady"] for r in runs["fp32"]]), "{:.3f}"))
    what = (f"{gpu}: GPT-2-124M shape (12 layers, 12 heads, 768 wide, block {args.block}, "
            f"byte vocabulary), 1 worker x micro-batch {args.micro_batch}, {args.steps} steps, "
            f"one checkpoint at the end, {args.repeats} interleaved repeats")
    mfu = median(r["mfu"] for r in runs["hybridray"])
    ratio = median(paired([r["steady"] for r in runs["hybridray"]],
                          [r["steady"] for r in runs["plain"]]))
    return "\n".join([
        section.header(what), repeats_table(rows, "measure (per repeat)"), "",
        f"hybridray train bf16+compile: median MFU {100 * mfu:.1f}% (goal >= 40%, stretch "
        f"45%): {'met' if mfu >= 0.40 else 'MISSED'}; Ray Train vs outside Ray, steady: "
        f"median paired ratio {ratio:.3f}"])


def gpu_topology(cpus: int) -> str:
    """clusters/local.yaml's on-prem site alone, its one node given this machine's GPU."""
    import yaml

    doc = yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    onprem = doc["sites"]["onprem"]
    onprem["links"] = {}
    pool = {**onprem["pools"][0], "cpus": cpus, "gpus": 1, "memory_gb": 32}
    # Ray labels a GPU node with its accelerator type; a pool that declares none would make
    # the node drift from the topology, and placement keeps off drift nodes.
    from ray._private.accelerators import NvidiaGPUAcceleratorManager

    accelerator = NvidiaGPUAcceleratorManager.get_current_node_accelerator_type()
    if accelerator:
        pool["accelerator"] = accelerator
    onprem["pools"] = [pool]
    doc.update(name="bench-gpu", sites={"onprem": onprem})
    return yaml.safe_dump(doc, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.plain_run:
        return plain_run(*args.plain_run)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here; run it on a machine with one", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from hybridray import cluster as lifecycle
    from hybridray.api import connect
    from hybridray.topology import load_topology

    section = Section(__file__, argv)
    home = tempfile.mkdtemp(prefix="hr-bench-gpu-")
    os.environ["HYBRIDRAY_HOME"] = home
    source = Path(home) / "bench-gpu.yaml"
    source.write_text(gpu_topology(max(4, min(8, os.cpu_count() or 4))))
    state = lifecycle.up(load_topology(source), source_file=source, home=home,
                         dashboard=False, timeout=300)
    os.environ.update(lifecycle.ray_env(state))
    runs: dict[str, list[dict]] = {side: [] for side, _ in SIDES}
    try:
        cluster = connect(state.name)
        run_hybridray(cluster, argparse.Namespace(**{**vars(args), "steps": 10}))  # warm-up
        specs = {"plain": plain_spec(cluster, overrides(args, "bf16")),
                 "fp32": plain_spec(cluster, overrides(args, "fp32"))}
        for i in range(args.repeats):
            order = [s for s, _ in SIDES]
            for side in (order if i % 2 == 0 else order[::-1]):
                r = run_hybridray(cluster, args) if side == "hybridray" else \
                    run_plain(specs[side], args)
                runs[side].append(r)
                print(f"repeat {i + 1}/{args.repeats} {side:<9} steady {r['steady']:,.0f} "
                      f"tokens/s, MFU {100 * r['mfu']:.1f}%, e2e {r['e2e']:,.0f}",
                      file=sys.stderr, flush=True)
    finally:
        import ray

        ray.shutdown()
        lifecycle.down(state.name, home=home)
    print(report(section, runs, args, torch.cuda.get_device_name(0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
