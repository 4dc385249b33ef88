"""The demo's script: each step calls the public function a user would call, in order.

    up → prepare restricted data on-prem → masked sync (and a refused one) → DDP training
    → quantized serving at several sites → real requests → a cloud node killed → down
    → a burst on an elastic cluster (cloud nodes from Ray's autoscaler, then none) → report

With ``hosts="netns"`` every node is a host of its own in a network namespace, sites joined
by shaped links (``hybridray up --hosts netns``): this process moves onto the head host to
drive the cluster (``netns.enter``), step 6 cuts cloud-b's link and heals it instead of
killing its node, and the report plots the traffic of every link against its shaped rate.

Nothing here re-implements placement, sync, training or serving: the steps call
``cluster.up``, ``sync_dataset``, ``train`` and ``serve.deploy`` and read back what they
decided (their results, and the audit log they all write to).
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridray.demo.narrator import Narrator
from hybridray.shipped import shipped

# Shipped with the package (and at the top of a checkout): the demo runs from anywhere.
CLUSTER_FILE = shipped("clusters/local.yaml")
TRAIN_CONFIG = shipped("configs/train/tiny.yaml")
TICKETS_MASK = shipped("configs/masks/tickets.yaml")


@dataclass(frozen=True)
class Settings:
    """How big each step is: ``quick`` for CI, the default for people."""

    train_steps: int
    max_files: int
    block_size: int
    micro_batch: int
    log_interval: int
    eval_interval: int
    ticket_files: int
    ticket_rows: int
    load_threads: int
    before_kill_s: float
    after_kill_s: float

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(train_steps=24, max_files=24, block_size=32, micro_batch=8,
                       log_interval=4, eval_interval=8, ticket_files=2, ticket_rows=300,
                       load_threads=3, before_kill_s=8, after_kill_s=10)
        return cls(train_steps=200, max_files=200, block_size=64, micro_batch=16,
                   log_interval=20, eval_interval=40, ticket_files=4, ticket_rows=2000,
                   load_threads=4, before_kill_s=30, after_kill_s=40)


def run_demo(cluster_file: str | os.PathLike = CLUSTER_FILE, *, name: str = "demo",
             home: str | os.PathLike | None = None, quick: bool = False,
             report_dir: str | os.PathLike | None = None, console: Any = None,
             hosts: str = "local") -> dict:
    """Run the demo end to end and write its report; returns the facts (``report.json``).

    Args:
        cluster_file: the topology (default: clusters/local.yaml).
        name: the cluster name, so the demo never collides with a cluster of yours.
        home: the hybridray home (default ``$HYBRIDRAY_HOME`` or ``~/.hybridray``).
        quick: small steps and short load phases (CI).
        report_dir: where ``report.md``, ``report.json`` and the plots go (default
            ``HOME/reports/NAME``).
        console: a rich ``Console`` (default: stdout).
        hosts: ``local`` (node processes on this machine) or ``netns`` (namespace hosts,
            shaped links, a partition and heal instead of a kill; needs root).
    """
    import hybridray
    from hybridray import cluster as lifecycle
    from hybridray.demo import serving
    from hybridray.home import hybridray_home

    home = Path(hybridray_home(home)).expanduser().absolute()
    os.environ["HYBRIDRAY_HOME"] = str(home)   # storage roots in local.yaml use it
    settings = Settings.for_mode(quick)
    out = Path(report_dir) if report_dir else home / "reports" / name
    n = Narrator(console)
    facts: dict[str, Any] = {"name": name, "mode": "quick" if quick else "full",
                             "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "started_ts": n.wall0, "home": str(home),
                             "settings": settings.__dict__, "hosts": hosts}
    topology = hybridray.load_topology(cluster_file, [f"name={name}"])
    _check_script_fits(topology, cluster_file)
    _import_ray_quietly()
    facts["topology"] = {s: {"kind": site.kind.value, "max_data_class": site.max_data_class.value,
                             "price_per_node_hour": site.pools[0].price_per_node_hour,
                             "spot": any(p.spot for p in site.pools)}
                         for s, site in topology.sites.items()}
    state = None
    links = None
    restore = lambda: None  # noqa: E731
    if hosts == "netns":
        from hybridray.cluster import netns

        netns.require_support()
    try:
        what = ("one host (network namespace) per node, shaped links" if hosts == "netns"
                else "one Ray node process per site")
        with n.step(f"1. up: {len(topology.sites)} sites as one Ray cluster",
                    spinner=f"starting {what} ..."):
            state = lifecycle.up(topology, source_file=cluster_file, overrides=[f"name={name}"],
                                 home=home, dashboard=False, timeout=180,
                                 progress=lambda line: n.say(line), hosts=hosts)
            facts["nodes"] = [{"key": x.key, "site": x.site, "pool": x.pool, "pid": x.pid,
                               "price_per_hour": x.price_per_hour, "up_at": n.now()}
                              for x in state.nodes]
            facts["started_processes"] = [
                {"pid": x.pid, "start_time": x.start_time, "what": f"ray node {x.key}"}
                for x in state.nodes] + [
                {"pid": v["pid"], "start_time": v.get("start_time"), "what": k}
                for k, v in state.services.items() if v.get("pid")]
        n.say(f"GCS {state.address}, token auth on, state in {state.state_dir}")
        n.say(f"watch it live in another shell: HYBRIDRAY_HOME={home} hybridray status "
              f"{name} --watch")
        out.mkdir(parents=True, exist_ok=True)
        restore = _quiet_ray(out / "ray-events.log")
        if state.netns:
            from hybridray.cluster import netns
            from hybridray.demo.links import LinkSampler

            links = LinkSampler(netns.NetRecord.from_json(state.netns), t0=n.wall0)
            links.start()
            netns.enter(netns.NetRecord.from_json(state.netns).host("head").netns)
            n.say("this process now runs on the head host (its namespace), as a driver does")
        cluster = hybridray.connect(name, home=home)
        _prepare(n, cluster, settings, facts)
        _sync(n, cluster, facts)
        result = _train(n, cluster, settings, facts)
        serving.run(n, cluster, state, result, settings, facts, token=secrets.token_urlsafe(24))
        facts["metrics_text"] = _scrape(name, home)
    except BaseException as e:   # the report still says how far it got, and why it stopped
        facts["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        if links is not None:
            facts["links"] = links.stop()
        _teardown(n, name, home, state, facts)
        if "error" not in facts and hosts == "local":   # its own cluster, once the first
            _burst(n, name, home, quick, facts)          # one is down
        restore()
        facts["duration_s"] = round(n.now(), 1)
        facts["steps"] = n.steps
        facts["decisions"] = n.decisions
        _report(n, facts, out, home)
    return facts


def _burst(n: Narrator, name: str, home: Path, quick: bool, facts: dict) -> None:
    """Step 8 (``hybridray/demo/burst.py``); a failure is reported, not raised."""
    from hybridray.demo import burst

    try:
        burst.run(n, name, home, quick, facts)
    except Exception as e:
        facts.setdefault("burst", {})["error"] = f"{type(e).__name__}: {e}"
        n.console.print(f"[red]burst step failed[/]: {type(e).__name__}: {e}")


def _report(n: Narrator, facts: dict, out: Path, home: Path) -> None:
    from hybridray.report import write_report

    try:
        with n.console.status("writing the report and its plots ..."):
            paths = write_report(facts, out, home=home)
    except Exception as e:  # never hide the demo's own outcome behind a report error
        n.console.print(f"[red]report failed[/]: {type(e).__name__}: {e}")
        return
    n.console.print(f"[bold green]report[/]: {paths['markdown']}  (facts: {paths['json']}, "
                    f"{len(paths['plots'])} plots)")
    left = (facts.get("processes") or {}).get("left", [])
    n.console.print(f"demo took {facts['duration_s']:.0f} s; {len(left)} of the processes it "
                    "started are left" + (f"; it stopped early: {facts['error']}"
                                          if facts.get("error") else ""))


def _check_script_fits(topology, cluster_file) -> None:
    """The script names its sites; a topology without them is refused before anything starts."""
    from hybridray.exceptions import ConfigError

    need = {"onprem": "restricted", "cloud-a": "confidential", "cloud-b": "internal"}
    wrong = [f"sites.{site}: needs max_data_class {cls}" for site, cls in need.items()
             if site not in topology.sites
             or topology.sites[site].max_data_class.value != cls]
    if wrong:
        raise ConfigError(f"{cluster_file}: the demo's script runs on clusters/local.yaml's "
                          f"sites ({'; '.join(wrong)}); use that file or one shaped like it")


def _import_ray_quietly() -> None:
    """Import Ray with its driver log level at warning (``ray.init`` binds the level from
    ``RAY_LOGGER_LEVEL`` at import); the variable is not left for the nodes to inherit."""
    import sys

    if "ray" in sys.modules or "RAY_LOGGER_LEVEL" in os.environ:
        return
    os.environ["RAY_LOGGER_LEVEL"] = "warning"
    try:
        import ray  # noqa: F401
    finally:
        os.environ.pop("RAY_LOGGER_LEVEL", None)


def _quiet_ray(log_path: Path):
    """Keep Ray's own chatter off the demo's console: INFO logs off, and the GCS error events
    Ray prints in the driver (a killed node's raylet dumps its state) go to ``log_path``.

    Patches ``ray._private.worker.print_to_stdstream`` (Ray 2.60 looks it up per message);
    returns the function that undoes it.
    """
    import logging

    import ray.data  # noqa: F401  (each configures its logger at import; quiet them after)
    import ray.serve  # noqa: F401

    for logger in ("ray", "ray.serve", "ray.train", "ray.tune"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        import ray._private.worker as worker
    except ImportError:  # another Ray: its chatter stays, the demo does not depend on it
        return lambda: None
    original = worker.print_to_stdstream

    def to_file(data, ignore_prefix: bool = False):
        if data.get("pid") == "raylet":
            with open(log_path, "a", encoding="utf-8") as f:
                f.write("\n".join(data.get("lines", [])) + "\n")
            return None
        return original(data, ignore_prefix)

    worker.print_to_stdstream = to_file
    return lambda: setattr(worker, "print_to_stdstream", original)


# ---- steps ---------------------------------------------------------------------------------

def _reasons(cluster, workload: str) -> tuple[list[str], str]:
    """(sites, why) of the latest audited decision for ``workload``."""
    recs = [r for r in cluster.audit.read() if r.get("workload") == workload
            and r["event"] in ("placement", "refusal")]
    if not recs:
        return [], "no decision recorded"
    r = recs[-1]
    if r["event"] == "refusal":
        return [], f"{r['rule']}: {r['message']}"
    excluded = r.get("excluded") or {}
    why = "; ".join(f"{s} excluded ({e})" for s, e in excluded.items())
    first = r["sites"][0]
    reason = (r.get("reasons") or {}).get(first, "")
    return r["sites"], (f"{first}: {reason}" + (f"; {why}" if why else "")).strip("; ")


def _prepare(n: Narrator, cluster, s: Settings, facts: dict) -> None:
    """Restricted data is made where it may live: tickets with PII, and the code corpus."""
    import ray

    from hybridray import Workload
    from hybridray.train import load_train_config, prepare_corpus

    with n.step("2. prepare restricted data on-prem",
                spinner="writing tickets and tokenizing the corpus at the data's site ..."):
        wl = Workload(name="make-tickets", cpus=0.5, data_classes=["restricted"],
                      data_site="onprem")
        where = ray.get(cluster.run(_write_tickets, wl, cluster.topology.model_dump(mode="json"),
                                    "datasets/tickets", s.ticket_files, s.ticket_rows),
                        timeout=300)
        _, why = _reasons(cluster, "make-tickets")
        n.decision("tickets with emails and phone numbers (restricted)", "ran",
                   [where["site"]], why, kind="task", data_class="restricted",
                   rows=where["rows"])
        config = load_train_config(TRAIN_CONFIG, _train_overrides(s))
        manifest = prepare_corpus(config.data, cluster.topology, cluster=cluster,
                                  name=config.name, progress=False)
        prepared = manifest.data.get("prepared_at_sites", [manifest.site])
        _, why = _reasons(cluster, f"{config.name}-corpus")
        n.decision(f"code corpus, {manifest.tokens('train'):,} training tokens (restricted)",
                   "ran", prepared, why or "the corpus is written at the data's site",
                   kind="data", data_class="restricted")
        facts["prepared"] = {"tickets": where, "corpus": {
            "address": str(manifest.address), "prepared_at_sites": prepared,
            "data_class": manifest.data["data_class"],
            "tokens": {k: v["tokens"] for k, v in manifest.data["splits"].items()}}}


def _write_tickets(topology: dict, path: str, files: int, rows: int) -> dict:
    """Runs as a task at the data's site: write a ticket table full of PII to its storage."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from hybridray import labels as L
    from hybridray.storage.fs import site_filesystem
    from hybridray.topology.models import Topology

    site = ray.get_runtime_context().get_node_labels()[L.SITE]
    fs, base = site_filesystem(Topology.model_validate(topology).sites[site])
    fs.create_dir(f"{base}/{path}", recursive=True)
    start = datetime.datetime(2024, 1, 1)
    for f in range(files):
        ids = list(range(f * rows, (f + 1) * rows))
        table = pa.table({
            "id": ids,
            "customer_email": [f"user{i}@example.com" for i in ids],
            "customer_phone": [f"+1 555 {100 + i % 900:03d} {1000 + i % 9000:04d}" for i in ids],
            "body": [f"ticket {i}: printer jam, call me on +1 555 010 {1000 + i % 9000:04d} "
                     f"or mail help{i}@corp.example.org" for i in ids],
            "created_at": pa.array([start + datetime.timedelta(minutes=7 * i) for i in ids],
                                   pa.timestamp("us")),
            "amount": [float((i * 37) % 500) for i in ids],
        })
        with fs.open_output_stream(f"{base}/{path}/part-{f:03d}.parquet") as out:
            pq.write_table(table, out)
    return {"site": site, "rows": files * rows, "files": files, "address": f"{site}:{path}"}


def _sync(n: Narrator, cluster, facts: dict) -> None:
    from hybridray.exceptions import PlacementRefused
    from hybridray.storage import sync_dataset

    with n.step("3. sync: masked to a cloud, and a refused one"):
        result = sync_dataset("onprem:datasets/tickets", "cloud-a:datasets/tickets",
                              cluster=cluster, mask=str(TICKETS_MASK), data_class="restricted",
                              overwrite=True, progress=True)
        read_at = result.sites.get("read") or result.sites.get("encode") or ["onprem"]
        write_at = result.sites.get("write") or ["cloud-a"]
        n.decision("sync tickets, masked (read + mask at the source)", "ran",
                   sorted(set(read_at)), f"raw rows never leave onprem; masked to "
                   f"{result.data_class}, which cloud-a may hold", kind="data",
                   data_class=result.source_class)
        n.decision("sync tickets, masked (write + verify at the destination)", "ran",
                   sorted(set(write_at)), f"{result.bytes_moved:,} bytes crossed onprem → "
                   f"cloud-a (${result.cost:.4f} egress)", kind="data",
                   data_class=result.data_class)
        facts["sync"] = result.to_json()
        try:
            sync_dataset("onprem:datasets/tickets", "cloud-b:datasets/tickets-raw",
                         cluster=cluster, data_class="restricted", progress=False)
            facts["refused_sync"] = {"refused": False}
            n.decision("sync raw tickets to cloud-b", "ran", ["cloud-b"],
                       "NOT REFUSED — this is a bug", kind="data", data_class="restricted")
        except PlacementRefused as e:
            facts["refused_sync"] = {"refused": True, "rule": e.rule, "message": str(e),
                                     "fix": e.fix, "destination": "cloud-b"}
            n.decision("sync raw tickets to cloud-b", "refused", [], f"{e.rule}: {e}",
                       kind="data", data_class="restricted")


def _train_overrides(s: Settings) -> list[str]:
    return [f"train.steps={s.train_steps}", f"data.max_files={s.max_files}",
            f"model.block_size={s.block_size}", f"train.micro_batch={s.micro_batch}",
            f"train.log_interval={s.log_interval}", f"train.eval_interval={s.eval_interval}",
            f"train.checkpoint_interval={s.train_steps}", "train.precision=bf16",
            "train.warmup_steps=2", "train.eval_batches=2", "train.resume=never",
            "name=demo-lm", "data.shard_files=12"]


def _train(n: Narrator, cluster, s: Settings, facts: dict):
    from hybridray.train import train

    with n.step("4. train: DDP, bf16, where the data's class allows"):
        result = train(TRAIN_CONFIG, cluster, overrides=_train_overrides(s), progress=True)
        placed = [r for r in cluster.audit.read("placement", kind="train")
                  if r.get("workload") in (result.name, "demo-lm")]
        why = ""
        if placed:
            ex = placed[-1].get("excluded") or {}
            why = "; ".join(f"{k} excluded ({v})" for k, v in ex.items())
        n.decision(f"train {result.name}: {len(result.worker_sites)} DDP workers, bf16",
                   "ran", result.worker_sites, why or "placed by policy", kind="train",
                   data_class=result.data_class)
        n.say(f"eval loss {result.initial_eval_loss:.3f} → {result.final_eval_loss:.3f} over "
              f"{result.steps} steps; checkpoint {result.checkpoint}")
        facts["training"] = {
            "run": result.name, "steps": result.steps, "data_class": result.data_class,
            "worker_sites": result.worker_sites, "planned_sites": result.planned_sites,
            "precision": result.metrics.get("precision"), "checkpoint": result.checkpoint,
            "initial_eval_loss": result.initial_eval_loss,
            "final_eval_loss": result.final_eval_loss, "eval_history": result.eval_history,
            "tokens_per_s": result.tokens_per_s, "elapsed_s": result.elapsed_s,
            "history": [{k: h.get(k) for k in ("step", "loss", "eval_loss", "tokens_per_s",
                                                "worker_sites")} for h in result.history],
        }
    return result


def _scrape(name: str, home: Path) -> str | None:
    """What ``hybridray metrics`` exports for this cluster right now (kept in the report)."""
    from hybridray.metrics import render

    try:
        return render(name, home=home)
    except Exception as e:  # the report says so; the demo itself succeeded
        return f"# metrics unavailable: {type(e).__name__}: {e}\n"


def _teardown(n: Narrator, name: str, home: Path, state, facts: dict) -> None:
    """Stop everything the demo started, then check every recorded pid is gone."""
    import ray

    from hybridray import cluster as lifecycle
    from hybridray.cluster.state import process_start_time, processes_using

    with n.step("7. down: stop every process the demo started",
                spinner="stopping Serve, the driver and every node ..."):
        timings: dict[str, float] = {}
        t = time.monotonic()
        try:
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
        except Exception as e:  # the cluster goes down anyway
            n.say(f"serve shutdown: {type(e).__name__}: {e}")
        timings["serve_shutdown_s"] = round(time.monotonic() - t, 1)
        if ray.is_initialized():
            ray.shutdown()
        if state is not None and state.netns:
            from hybridray.cluster import netns

            netns.leave()  # back to the operator's namespace, where the links are removed
        facts["teardown"] = timings
        if state is None:
            facts["processes"] = {"recorded": [], "left": []}
            return
        t = time.monotonic()
        try:
            stopped = lifecycle.down(name, home=home)
        except Exception as e:
            n.say(f"down failed: {type(e).__name__}: {e}")
            stopped = []
        timings["down_s"] = round(time.monotonic() - t, 1)
        facts["down_at"] = n.now()
        # every process the demo started or saw start: node leaders, the S3 server, and
        # every process of the node it killed; (pid, start time) so a reused pid never counts
        started = facts.get("started_processes", []) + facts.get("killed_processes", [])
        pids = sorted({p["pid"] for p in started})
        deadline = time.monotonic() + 20
        left: list[int] = []
        while True:   # reaped children can linger for a moment
            left = sorted({p["pid"] for p in started
                           if process_start_time(p["pid"]) is not None
                           and process_start_time(p["pid"]) == p.get("start_time")})
            left += [p for p in processes_using(state.temp_dir + "/") if p not in left]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        facts["processes"] = {"recorded": pids, "stopped_by_down": stopped, "left": left}
        n.say(f"{len(stopped)} node process(es) stopped by down, {len(pids)} recorded pids "
              f"checked, {len(left)} left")
