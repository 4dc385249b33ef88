"""Driver for the site-loss test: deploy at two sites, load, kill one site's node, keep loading.

Run by ``test_site_loss.py`` in its own process, against its own cluster:

    python -m tests.serve.site_loss_driver CLUSTER PORT SOURCE

It prints one JSON line: requests answered per site before and after the kill, failures,
and the errors seen. The cluster's environment (``ray_env``) comes from the caller.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading
import time

PRE_KILL = 15          # answered requests before the node is killed
POST_KILL = 40         # answered requests after it
DEADLINE_S = 150       # bounded, whatever happens


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process of a node: its ``ray start`` session (Ray puts each worker in
    its own process group, so killing the node's group alone would leave replicas running)."""
    victims = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    victims.append(int(entry.name))
            except OSError:
                continue
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return victims


def main(cluster_name: str, port: int, source: str) -> dict:
    import openai

    import hybridray
    from hybridray.cluster import load_state
    from hybridray.serve.config import parse_serve_config
    from hybridray.serve.service import deploy

    token = "site-loss-token-" + "z" * 20
    os.environ["HYBRIDRAY_SERVE_TOKENS"] = token
    cluster = hybridray.connect(cluster_name)
    config = parse_serve_config(f"""
name: t-sites
http: {{host: 127.0.0.1, port: {port}, proxy_location: HeadOnly}}
limits: {{request_timeout_s: 20}}
ingress: {{replicas: 2, cpus: 0.1, assign_timeout_s: 2, suspect_s: 10}}
models:
  - name: gpt
    kind: completion
    source: {source}
    quantize: none
    replica: {{cpus: 0.5, threads: 1, health_check_period_s: 1, health_check_timeout_s: 5}}
    sites: {{cloud-a: {{min_replicas: 1, max_replicas: 1}},
             cloud-b: {{min_replicas: 1, max_replicas: 1}}}}
""")
    t0 = time.monotonic()
    service = deploy(config, cluster=cluster, timeout_s=300)
    deploy_s = time.monotonic() - t0
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=token, max_retries=6,
                           timeout=20)
    before: collections.Counter = collections.Counter()
    after: collections.Counter = collections.Counter()
    errors: list[str] = []
    killed = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()

    def loop() -> None:
        while not stop.is_set():
            try:
                r = client.completions.with_raw_response.create(
                    model="gpt", prompt="The", max_tokens=4,
                    extra_headers={"X-Hybridray-Site": "cloud-b"})
                r.parse()
                with lock:
                    (after if killed.is_set() else before)[r.headers["x-hybridray-site"]] += 1
            except Exception as e:  # counted; the test decides
                with lock:
                    errors.append(f"{'after' if killed.is_set() else 'before'}: {e!r}"[:300])

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(3)]
    start = time.monotonic()
    for t in threads:
        t.start()
    while sum(before.values()) < PRE_KILL and time.monotonic() - start < DEADLINE_S:
        time.sleep(0.1)
    state = load_state(cluster_name)
    node = next(n for n in state.nodes if n.site == "cloud-b")
    killed.set()
    kill_session(node.pid)                      # the whole site goes dark at once
    killed_at = time.monotonic()
    while sum(after.values()) < POST_KILL and time.monotonic() - start < DEADLINE_S:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return {"before": dict(before), "after": dict(after), "errors": errors,
            "failed": len(errors), "deploy_s": round(deploy_s, 1),
            "post_kill_s": round(time.monotonic() - killed_at, 1)}


if __name__ == "__main__":
    result = main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    print("RESULT " + json.dumps(result), flush=True)
