"""``attach`` to a cluster hybridray did not start, drive it with every command, and attack it.

The cluster is started here by plain ``ray start`` commands (``plain_ray.py``): a head and an
on-prem and a cloud-a node labelled by ``hybridray.labels.node_labels``, with token auth and
mutual TLS from ``hybridray certs``. Its nodes run with an empty ``HYBRIDRAY_HOME``, as
remote hosts would, so a job that finds the topology found it through Ray, not this disk.
Everything goes through the CLI or separate driver processes, the way an operator works;
this pytest process never becomes a driver of it. Later tests add rogue nodes to it, so it is
this module's own cluster, never the shared one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hybridray import labels as L
from hybridray.cluster.ports import free_ports
from hybridray.cluster.state import load_state
from hybridray.topology import load_topology
from tests.cluster.plain_ray import PlainCluster, clean_env
from tests.paths import CLUSTERS, ROOT

pytestmark = pytest.mark.slow
NAME = "prod"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The operator's machine: a working directory with ``secrets/`` from hybridray certs, a
    hybridray home, storage roots, and the plain Ray cluster."""
    base = tmp_path_factory.mktemp("attach")
    home, work = base / "home", base / "work"
    work.mkdir()
    from ray._private.services import get_node_ip_address

    ip = get_node_ip_address()
    made = hr(["certs", str(CLUSTERS / "local.yaml"), "--out", "secrets", "--head-address", ip],
              cwd=work, home=home)
    assert made.returncode == 0, made.stderr
    storage = {s: f"sites.{s}.storage.root=file://{base}/storage/{s}"
               for s in ("onprem", "cloud-a", "cloud-b")}
    topo = load_topology(CLUSTERS / "local.yaml", list(storage.values()))
    (base / "logs").mkdir()
    (base / "node-home").mkdir()
    cluster = PlainCluster(topo, work / "secrets", base / "logs", base / "node-home", ip)
    try:
        cluster.start_head()
        cluster.add_node("onprem", "onprem")
        cluster.add_node("cloud-a", "cloud-a")
        nodes = cluster.wait_for(3)
        yield {"base": base, "home": home, "work": work, "cluster": cluster, "nodes": nodes,
               "overrides": list(storage.values())}
    finally:
        cluster.stop()


def hr(args: list[str], *, cwd: Path | None = None, home: Path, env: dict | None = None,
       timeout: float = 300) -> subprocess.CompletedProcess:
    """``hybridray ARGS`` from a fresh shell: no RAY_* variable, only HYBRIDRAY_HOME."""
    return subprocess.run([sys.executable, "-m", "hybridray", *args], cwd=cwd or ROOT,
                          env={**clean_env(HYBRIDRAY_HOME=str(home)), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 with one ``error:`` line naming the problem, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout[-2000:] + err[-3000:]
    assert "Traceback" not in err and err.startswith("error: "), err[-3000:]
    for needle in needles:
        assert needle in err, err
    return err


def attach_args(site, name: str, *extra: str) -> list[str]:
    return ["attach", name, "--address", site["cluster"].address, "--topology",
            str(CLUSTERS / "local.yaml"), *site["overrides"], *extra]


def node_ids(site, where: str) -> list[str]:
    return [n["node_id"] for n in site["nodes"] if n["alive"]
            and n["labels"].get(L.SITE) == where and n["labels"].get(L.ROLE) == "worker"]


def driver(site, code: str, timeout: float = 240) -> dict:
    """A Python driver script (a user's), in a fresh shell; returns its last line as JSON."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=clean_env(HYBRIDRAY_HOME=str(site["home"])), text=True,
                          capture_output=True, timeout=timeout)
    return json.loads(ok(proc).strip().splitlines()[-1])


# ---- attaching ----------------------------------------------------------------------------

def test_attach_refuses_what_cannot_work_with_one_line_each(site, tmp_path):
    home, work = site["home"], site["work"]
    free = free_ports(1)[0]
    refused(hr(["attach", "x", "--address", f"127.0.0.1:{free}", "--topology",
                str(CLUSTERS / "local.yaml")], cwd=work, home=home), "nothing answers at")
    address = site["cluster"].address
    base = ["attach", "x", "--address", address, "--topology", str(CLUSTERS / "local.yaml")]
    (tmp_path / "wrong").write_text("0" * 64)
    refused(hr([*base, "--token-file", str(tmp_path / "wrong")], cwd=work, home=home),
            "refused the token", "InvalidAuthToken")
    refused(hr([*base, "--token-file", str(tmp_path / "missing")], cwd=work, home=home),
            "does not exist")
    refused(hr([*base, "--no-tls"], cwd=work, home=home), "runs TLS", "--tls-dir")
    ok(hr(["certs", str(CLUSTERS / "local.yaml"), "--out", str(tmp_path / "other")],
          home=home))                                    # another cluster's CA
    refused(hr([*base, "--tls-dir", str(tmp_path / "other")], cwd=work, home=home),
            "not signed by")
    refused(hr([*base[:-1], str(tmp_path / "nope.yaml")], cwd=work, home=home), "nope.yaml")
    other = yaml.safe_load((CLUSTERS / "local.yaml").read_text())   # sites named otherwise
    other["sites"] = {f"x-{k}": {**v, "links": {}} for k, v in other["sites"].items()}
    other["head"]["site"] = "x-onprem"
    (tmp_path / "elsewhere.yaml").write_text(yaml.safe_dump(other))
    refused(hr([*base[:-1], str(tmp_path / "elsewhere.yaml")], cwd=work, home=home),
            "none of the 3 live node(s)", "site 'onprem' is not in the topology")
    assert not (home / "clusters" / "x" / "state.json").exists()


def test_attach_reports_nodes_whose_labels_claim_more_than_their_site_as_drift(site):
    # the same cluster under a stricter topology: on-prem may hold only internal data now
    out = ok(hr(attach_args(site, "strict", "sites.onprem.max_data_class=internal",
                            "--dashboard", site["cluster"].dashboard),
                cwd=site["work"], home=site["home"]))
    assert out.count("DRIFT") == 2, out                 # the head and the on-prem node
    assert "claims hybridray.io/max-data-class=restricted, above site onprem's internal" in out
    report = json.loads(ok(hr(["status", "strict", "--json"], home=site["home"])))
    assert {d["node_id"] for d in report["drift"]} == {
        n["node_id"] for n in site["nodes"] if n["labels"][L.SITE] == "onprem"}
    assert report["unrecorded_nodes"] == 2
    assert [n["site"] for n in report["nodes"]] == ["cloud-a"]   # the one member
    ok(hr(["detach", "strict"], home=site["home"]))


def test_attach_with_the_files_hybridray_certs_wrote(site):
    # no --token-file, no --tls-dir: secrets/token, secrets/trust.pem, a nodes/local-SITE.crt
    out = ok(hr(attach_args(site, NAME, "--dashboard", site["cluster"].dashboard),
                cwd=site["work"], home=site["home"]))
    assert f"attached {NAME!r}" in out and "3 member node(s)" in out and "DRIFT" not in out
    state = load_state(NAME, home=site["home"])
    assert state.attached and state.nodes == [] and state.dashboard_url == \
        site["cluster"].dashboard
    assert state.token_path == str(site["work"] / "secrets" / "token")
    assert state.tls["RAY_TLS_CA_CERT"] == str(site["work"] / "secrets" / "trust.pem")
    assert state.member_ids() == {n["node_id"] for n in site["nodes"]}
    assert state.topology().name == NAME
    refused(hr(attach_args(site, NAME), cwd=site["work"], home=site["home"]),
            "already attached")


# ---- every command against it ------------------------------------------------------------

def test_status_env_place_metrics_and_watch_work_as_on_a_local_cluster(site):
    home = site["home"]
    report = json.loads(ok(hr(["status", NAME, "--json"], home=home)))
    assert report["origin"] == "attach" and report["state"] == "up" and report["drift"] == []
    assert report["sites"]["onprem"]["alive"] == 2 and report["sites"]["cloud-a"]["alive"] == 1
    assert report["sites"]["onprem"]["cpus_total"] == 2
    assert report["price_per_hour"] == pytest.approx(0.40 + 0.34)
    listing = ok(hr(["status"], home=home))
    assert NAME in listing and "attached" in listing
    env = ok(hr(["env", NAME], home=home))
    assert f"export RAY_ADDRESS={site['cluster'].address}" in env
    assert "export RAY_USE_TLS=1" in env and "RAY_API_SERVER_ADDRESS" in env
    placed = json.loads(ok(hr(["place", NAME, "--live", "--data-class", "restricted",
                               "--json"], home=home)))
    assert placed["sites"] == ["onprem"] and "ray.io/node-id" not in json.dumps(placed)
    scrape = ok(hr(["metrics", NAME, "--once"], home=home))
    assert f'hybridray_site_up{{cluster="{NAME}",site="cloud-a",kind="cloud"}} 1' in scrape
    assert f'hybridray_site_up{{cluster="{NAME}",site="cloud-b",kind="cloud"}} 0' in scrape
    watch = ok(hr(["status", NAME, "--watch", "--count", "1"], home=home))
    assert "is up" in watch and "onprem" in watch
    plan = ok(hr(["serve", str(ROOT / "jobs/configs/serve-embed.yaml"), "--plan",
                  "--cluster", NAME], home=home))
    assert "cloud-a" in plan


def test_sync_verify_and_ls_move_data_between_its_sites(site):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = site["base"] / "storage" / "onprem" / "datasets" / "tickets"
    src.mkdir(parents=True)
    pq.write_table(pa.table({"id": list(range(50)), "text": [f"t{i}" for i in range(50)]}),
                   src / "part-0.parquet")
    home, c = site["home"], ["--cluster", NAME]
    result = json.loads(ok(hr(["sync", "onprem:datasets/tickets", "cloud-a:datasets/tickets",
                               *c, "--data-class", "internal", "--json"], home=home)))
    assert result["outcome"] == "committed" and result["rows"] == 50
    assert result["sites"] == {"read": ["onprem"], "write": ["cloud-a"]}
    checked = json.loads(ok(hr(["verify", "cloud-a:datasets/tickets", *c, "--json"],
                               home=home)))
    assert checked["rows"] == 50 and checked["site"] == "cloud-a"
    listed = json.loads(ok(hr(["ls", "cloud-a:", *c, "--json"], home=home)))
    assert [d["address"] for d in listed] == ["cloud-a:datasets/tickets"]


def test_train_from_a_fresh_shell(site):
    # issue 15.8: the train command imports Ray before it connects; connect must still set
    # the token (and TLS) for Ray, with nothing exported in the shell
    out = ok(hr(["train", "configs/train/tiny.yaml", "--cluster", NAME, "--json",
                 "--no-progress", "name=attached", "data.max_files=12", "data.shard_files=12",
                 "model.block_size=32", "train.micro_batch=4", "train.workers=1",
                 "train.steps=2", "train.eval_interval=2", "train.eval_batches=1",
                 "train.checkpoint_interval=2", "train.log_interval=1",
                 "train.warmup_steps=1", "metrics.progress=false"], home=site["home"]))
    lines = out.splitlines()
    result = json.loads("\n".join(lines[len(lines) - 1 - lines[::-1].index("{"):]))
    assert result["steps"] == 2 and set(result["worker_sites"]) == {"onprem"}


def test_serve_deploys_answers_and_is_removed(site):
    import urllib.request

    port, token = free_ports(1)[0], "attach-serve-" + "x" * 24
    config = [str(ROOT / "jobs/configs/serve-embed.yaml"), "--cluster", NAME,
              f"http.port={port}", "ingress.replicas=1",
              "models.0.sites={cloud-a: {min_replicas: 1, max_replicas: 1}}"]
    env = {"HYBRIDRAY_SERVE_TOKENS": token}
    ok(hr(["serve", *config, "--timeout", "300"], home=site["home"], env=env))
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/embeddings", method="POST",
            data=json.dumps({"model": "minilm", "input": "hello", "encoding_format": "float"})
            .encode(), headers={"Authorization": f"Bearer {token}",
                                "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
        assert len(body["data"][0]["embedding"]) == 384
        status = json.loads(ok(hr(["serve", *config, "--status", "--json"], home=site["home"],
                                  env=env)))
        assert any("cloud-a" in dep for app in status.values()
                   for dep in app["deployments"])
    finally:
        ok(hr(["serve", *config, "--delete"], home=site["home"], env=env))


JOB = """
import json, sys, ray, hybridray
cluster = hybridray.connect()          # HYBRIDRAY_CLUSTER from submit; no record on this node
wl = hybridray.Workload(name="in-job", cpus=1, data_classes=["restricted"])
def where():
    return ray.get_runtime_context().get_node_labels()["hybridray.io/site"]
seen = {"task_site": ray.get(cluster.run(where, wl)), "cluster": cluster.name,
        "audit": type(cluster.audit).__name__}
open(sys.argv[1], "w").write(json.dumps(seen))   # job stdout is not reliably shown (issue 11)
"""


def test_submit_places_the_entrypoint_and_the_job_finds_the_cluster_through_ray(site,
                                                                               tmp_path):
    (tmp_path / "job.py").write_text(JOB)
    out = ok(hr(["submit", "--cluster", NAME, "--site", "cloud-a", "--data-class", "internal",
                 "--working-dir",
                 str(tmp_path), "--", "python", "job.py", str(tmp_path / "seen.json")],
                home=site["home"]))
    assert "SUCCEEDED" in out and "its entrypoint ran at site cloud-a" in out
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == {"task_site": "onprem", "cluster": NAME, "audit": "QueuedAuditLog"}
    # the job's placement was queued in the cluster and drained into the operator's log
    records = [json.loads(line) for line in ok(hr(["audit", NAME, "--json", "--tail", "0"],
                                                  home=site["home"])).splitlines()]
    assert any(r.get("workload") == "in-job" and r.get("queued") for r in records)


# ---- drift, by attack --------------------------------------------------------------------

ROGUE_RUN = """
import json, time, ray, hybridray
from hybridray import Workload, data_remote_args, scaling_config, serve_options
from hybridray import job_submit_kwargs
cluster = hybridray.connect("prod")
ROGUE = {rogue!r}
def node():
    time.sleep(0.5)
    return ray.get_runtime_context().get_node_id()
class Holder:
    def node(self):
        return ray.get_runtime_context().get_node_id()
wl = Workload(name="pii", cpus=1, data_classes=["restricted"])
tasks = ray.get([cluster.run(node, wl) for _ in range(6)], timeout=180)
holders = [cluster.actor(Holder, Workload(name="pii-actor", cpus=0.5,
                                          data_classes=["restricted"])) for _ in range(2)]
actors = ray.get([h.node.remote() for h in holders], timeout=180)
placement = cluster.place(Workload(name="pii-stage", cpus=1, count=2,
                                   data_classes=["restricted"]))
stage = ray.data.range(8, override_num_blocks=8).map_batches(
    lambda b: {{"node": [ray.get_runtime_context().get_node_id()] * len(b["id"])}},
    batch_size=1, **data_remote_args(placement))
data_nodes = {{r["node"] for r in stage.take_all()}}
compiled = [scaling_config(placement, 2).label_selector[0],
            serve_options(placement)["ray_actor_options"]["label_selector"],
            job_submit_kwargs(placement)["entrypoint_label_selector"],
            data_remote_args(placement)["label_selector"]]
# the attacker's own selector, naming the rogue node: the guard in the worker refuses
@ray.remote(num_cpus=1, label_selector={{"ray.io/node-id": ROGUE}})
def steal():
    hybridray.check_residency("restricted")
    return "read restricted rows"
try:
    stolen = ray.get(steal.remote(), timeout=120)
except hybridray.NodeNotMember as e:
    stolen = f"refused: {{e.rule}}"
print(json.dumps({{"tasks": tasks, "actors": actors, "data": sorted(data_nodes),
                  "compiled": compiled, "stolen": stolen}}))
"""


def test_a_rogue_node_with_the_token_and_onprem_labels_gets_no_placed_work(site):
    cluster = site["cluster"]
    before = {n["node_id"] for n in site["nodes"]}
    cluster.add_node("rogue", "onprem")                     # the cluster's own token + certs
    cluster.add_node("greedy", "cloud-a", labels={L.MAX_DATA_CLASS: "restricted"})
    nodes = cluster.wait_for(5)
    new = {n["node_id"]: n for n in nodes if n["alive"] and n["node_id"] not in before}
    rogue = next(i for i, n in new.items() if n["labels"][L.SITE] == "onprem")
    greedy = next(i for i, n in new.items() if n["labels"][L.SITE] == "cloud-a")

    report = json.loads(ok(hr(["status", NAME, "--json"], home=site["home"])))
    drift = {d["node_id"]: d for d in report["drift"]}
    assert set(drift) == {rogue, greedy} and report["unrecorded_nodes"] == 2
    assert drift[rogue]["reasons"] == ["not a recorded member (joined without hybridray up, "
                                       "attach or admit)"]
    assert "above site cloud-a's confidential" in " ".join(drift[greedy]["reasons"])
    assert report["sites"]["onprem"]["alive"] == 2          # head + on-prem node: drift adds none
    assert "DRIFT" in ok(hr(["status", NAME], home=site["home"]))

    seen = driver(site, ROGUE_RUN.format(rogue=rogue))
    onprem = node_ids(site, "onprem")
    assert len(seen["tasks"]) == 6 and set(seen["tasks"]) == set(onprem)    # 0 of 6 on rogue
    assert set(seen["actors"]) <= set(onprem) and seen["data"] == onprem
    for selector in seen["compiled"]:       # Train workers, Serve replicas, jobs, Data stages
        assert rogue in selector["ray.io/node-id"] and greedy in selector["ray.io/node-id"]
        assert selector["ray.io/node-id"].startswith("!in(")
    assert seen["stolen"] == "refused: drift"

    records = [json.loads(line) for line in ok(hr(["audit", NAME, "--event", "drift", "--json",
                                                   "--tail", "0"], home=site["home"]))
               .splitlines()]
    refusals = [r for r in records if r["action"] == "refused-in-worker"]
    assert [n["node_id"] for r in refusals for n in r["nodes"]] == [rogue]
    excluded = [r for r in records if r["action"] == "excluded"]
    assert {"pii", "pii-actor", "pii-stage"} <= {r["workload"] for r in excluded}
    assert all({rogue, greedy} <= {n["node_id"] for n in r["nodes"]} for r in excluded)

    # a node that really belongs is admitted by id; one that claims too much never is
    refused_out = hr(["admit", NAME, greedy[:12]], home=site["home"])
    assert refused_out.returncode == 2 and "NOT admitted" in refused_out.stdout
    ok(hr(["admit", NAME, rogue[:12]], home=site["home"]))
    report = json.loads(ok(hr(["status", NAME, "--json"], home=site["home"])))
    assert [d["node_id"] for d in report["drift"]] == [greedy]
    assert report["sites"]["onprem"]["alive"] == 3
    assert rogue in load_state(NAME, home=site["home"]).member_ids()


def test_down_refuses_and_detach_leaves_the_cluster_running(site):
    refused(hr(["down", NAME], home=site["home"]), "was attached", f"hybridray detach {NAME}")
    out = ok(hr(["detach", NAME], home=site["home"]))
    assert "keeps running" in out
    assert not (site["home"] / "clusters" / NAME).exists()
    assert all(p.poll() is None for p in site["cluster"].procs)
    assert len([n for n in site["cluster"].wait_for(5, timeout=5) if n["alive"]]) == 5
    refused(hr(["status", NAME], home=site["home"]), f"no cluster named {NAME!r}")
