"""Driver of the partition drill, run on the head host of a namespace cluster:

    ip netns exec HEAD_NS python -m tests.cluster.netns_drill_driver CLUSTER PORT WORKDIR

It serves a model at cloud-a and cloud-b under steady load (most requests asking for cloud-b
first), trains on-prem and syncs a dataset into cloud-b, while the test (in the root
namespace, which owns the links) cuts and heals cloud-b. The training is running when the
link is cut, and the driver reports the cut phase done only once it has finished, so the
whole run stays inside the partition's window. The two talk in lines: the driver
prints ``PHASE NAME {json}`` and waits for the test's next line on stdin (``cut``, then
``healed``); the last line it prints is ``RESULT {json}``. Every wait is bounded.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

DEADLINE_S = 240        # of any one wait
STEADY = 24             # requests answered before the cut (cloud-b among them)
TRAIN_STEPS = 3000      # past the GCS's verdict on the cut; the driver waits for the end
TRAIN_WARM_STEPS = 5    # the cut comes only once the training has taken this many steps


def phase(name: str, **info) -> None:
    print(f"PHASE {name} {json.dumps(info, default=str)}", flush=True)


def wait_for(line: str) -> None:
    got = sys.stdin.readline().strip()
    if got != line:
        raise RuntimeError(f"expected {line!r} from the test, got {got!r}")


def main(cluster_name: str, port: int, workdir: str) -> dict:
    import openai

    import hybridray
    from hybridray.serve.config import parse_serve_config
    from hybridray.serve.service import deploy
    from hybridray.storage import open_dataset, sync_dataset
    from hybridray.storage.verify import verify_dataset
    from hybridray.train.trainer import train
    from tests.data.conftest import INTERNAL_MASK, write_tickets

    work = Path(workdir)
    cluster = hybridray.connect(cluster_name)
    topology = cluster.topology
    onprem = Path(topology.sites["onprem"].storage.path)
    mask = work / "internal-mask.yaml"
    mask.write_text(INTERNAL_MASK)

    # v1 of a dataset at cloud-b, committed before anything is cut
    write_tickets(onprem / "drill", files=2, rows=200)
    v1 = sync_dataset("onprem:drill", "cloud-b:drill", cluster=cluster, mask=str(mask))
    write_tickets(onprem / "drill", files=3, rows=200, seed=7)   # what v2 would carry

    # training on-prem, long enough to run through the whole drill
    train_out: dict = {}

    def run_training() -> None:
        t0 = time.time()
        try:
            r = train({"name": "drill"}, cluster, progress=False, overrides=[
                "model.block_size=32", "train.micro_batch=4", "train.eval_batches=2",
                "train.warmup_steps=2", "train.max_failures=1", "data.max_files=12",
                "data.shard_files=6", "metrics.progress=false", "train.workers=1",
                f"train.steps={TRAIN_STEPS}", "train.log_interval=100",
                f"train.eval_interval={TRAIN_STEPS}", f"train.checkpoint_interval={TRAIN_STEPS}"])
            train_out.update(ok=True, steps=r.steps, planned=TRAIN_STEPS, restarts=r.restarts,
                             sites=r.worker_sites, attempts=len(r.attempts),
                             stepping_since=r.attempts[0]["started_at"] if r.attempts else None)
        except Exception as e:
            train_out.update(ok=False, error=repr(e)[:500])
        train_out.update(started=t0, ended=time.time())

    def training_step() -> int:
        """The step the training reports to its progress board (a named actor on the head)."""
        import ray

        try:
            boards = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith("hybridray-train-")]
            return max((ray.get(ray.get_actor(b).poll.remote(0), timeout=5)["step"]
                        for b in boards), default=0)
        except Exception:
            return 0

    trainer = threading.Thread(target=run_training, daemon=True)

    token = "drill-token-" + "q" * 24
    os.environ["HYBRIDRAY_SERVE_TOKENS"] = token
    config = parse_serve_config(f"""
name: t-drill
http: {{host: 127.0.0.1, port: {port}, proxy_location: HeadOnly}}
limits: {{request_timeout_s: 20}}
ingress: {{replicas: 2, cpus: 0.1, assign_timeout_s: 2, suspect_s: 10}}
models:
  - name: gpt
    kind: completion
    source: cloud-a:checkpoints/drill
    quantize: none
    replica: {{cpus: 0.5, threads: 1, health_check_period_s: 1, health_check_timeout_s: 5}}
    sites: {{cloud-a: {{min_replicas: 1, max_replicas: 1}},
             cloud-b: {{min_replicas: 1, max_replicas: 1}}}}
""")
    service = deploy(config, cluster=cluster, timeout_s=300)
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=token, max_retries=0,
                           timeout=20)
    lock = threading.Lock()
    answered: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    stats = collections.Counter()
    errors: list[str] = []
    period = ["steady"]
    stop = threading.Event()

    def ask(site: str):
        r = client.completions.with_raw_response.create(
            model="gpt", prompt="The", max_tokens=4, temperature=0,
            extra_headers={"X-Hybridray-Site": site})
        return r.headers["x-hybridray-site"], r.parse().choices[0].text

    first_text: dict[str, str] = {}   # greedy decoding: every answer must be this one

    def loop(i: int) -> None:
        while not stop.is_set():
            site = "cloud-b" if i % 4 != 3 else "cloud-a"
            now = period[0]
            try:
                try:
                    where, text = ask(site)
                except Exception as first:          # the one client retry
                    with lock:
                        stats[f"{now}:retried"] += 1
                        errors.append(f"{now} first try: {first!r}"[:200])
                    where, text = ask(site)
                with lock:
                    stats[f"{now}:answered"] += 1
                    answered[now][where] += 1
                    if first_text.setdefault("text", text) != text:
                        stats[f"{now}:wrong"] += 1
            except Exception as e:
                with lock:
                    stats[f"{now}:failed"] += 1
                    errors.append(f"{now} after retry: {e!r}"[:200])
            time.sleep(0.05)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    while ((sum(answered["steady"].values()) < STEADY or not answered["steady"]["cloud-b"])
           and time.monotonic() - t0 < DEADLINE_S):
        time.sleep(0.5)
    # The training starts only now, so the cut comes a few steps into it and all the rest of
    # its steps lie ahead of the GCS's verdict (started beside the deployment, it had once
    # finished before the verdict came).
    trainer.start()
    while training_step() < TRAIN_WARM_STEPS and time.monotonic() - t0 < DEADLINE_S:
        time.sleep(0.2)
    phase("loaded", answered=dict(answered["steady"]), training=trainer.is_alive(),
          training_step=training_step(), planned=TRAIN_STEPS)

    wait_for("cut")       # the test says so once the GCS has declared cloud-b's node dead
    cut_at = time.time()
    at_verdict = {"step": training_step(), "alive": trainer.is_alive()}
    with lock:
        period[0] = "cut"
    sync_error = None
    t0 = time.monotonic()
    try:
        sync_dataset("onprem:drill", "cloud-b:drill", cluster=cluster, mask=str(mask))
    except Exception as e:  # the test checks which error, and that v1 survived
        sync_error = {"type": type(e).__name__, "message": str(e)[:500]}
    sync_s = time.monotonic() - t0
    time.sleep(5)        # keep serving through the cut for a while
    trainer.join(timeout=DEADLINE_S * 2)   # the training runs its course inside the cut
    phase("cut-checked", sync_error=sync_error, sync_s=round(sync_s, 1), at_verdict=at_verdict,
          answered=dict(answered["cut"]))

    wait_for("healed")
    healed_at = time.time()
    with lock:
        period[0] = "healed"
    report = verify_dataset("cloud-b:drill", cluster=cluster, raise_on_error=False)
    after_cut = {"version": open_dataset("cloud-b:drill", cluster=cluster).version,
                 "verified": report.ok}
    v2 = sync_dataset("onprem:drill", "cloud-b:drill", cluster=cluster, mask=str(mask))
    t0 = time.monotonic()
    while not answered["healed"]["cloud-b"] and time.monotonic() - t0 < DEADLINE_S:
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    trainer.join(timeout=DEADLINE_S)
    return {"answered": {k: dict(v) for k, v in answered.items()}, "stats": dict(stats),
            "errors": errors[:20], "text": first_text.get("text"),
            "v1": {"version": v1.version, "outcome": v1.outcome},
            "after_cut": after_cut, "v2": {"version": v2.version, "outcome": v2.outcome},
            "training": train_out, "cut_at": cut_at, "healed_at": healed_at}


if __name__ == "__main__":
    try:
        result = main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    except Exception:
        result = {"crashed": traceback.format_exc()[-3000:]}
    print("RESULT " + json.dumps(result, default=str), flush=True)
