"""Loader and models: one clear error per bad file, overrides, storage roots, data classes.

The corpus under ``tests/topology/bad/`` holds one mistake per file; ``bad/EXPECTED.yaml`` maps
each file to a fragment its single error line must contain (the key path and the fix).
``tests/test_cli_validate.py`` runs the same corpus through ``hybridray validate``.
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from hybridray.exceptions import ConfigError
from hybridray.topology import DataClass, Link, load_topology, parse_topology
from hybridray.topology.loader import MAX_FILE_BYTES

BAD = Path(__file__).resolve().parent / "bad"
EXPECTED: dict[str, str] = yaml.safe_load((BAD / "EXPECTED.yaml").read_text(encoding="utf-8"))
BAD_FILES = sorted(p for p in BAD.glob("*.yaml") if p.name != "EXPECTED.yaml")
UNSET_VAR = "HYBRIDRAY_TEST_UNSET_VAR"  # used by bad/unset_env_var.yaml
# Signs of an error that leaked out raw instead of being explained.
LEAKS = ("Traceback", "pydantic", "errors.pydantic.dev", "For further information",
         "instance of", "[type=", "Value error,")

BASE = textwrap.dedent("""\
    name: test
    head: {site: onprem}
    sites:
      onprem:
        kind: onprem
        provider: local
        max_data_class: restricted
        storage: {root: file:///tmp/hybridray-test/onprem}
        pools:
          - {name: cpu, cpus: 2, memory_gb: 4, count: 1, price_per_node_hour: 0.4}
          - {name: gpu, cpus: 8, gpus: 1, accelerator: T4, memory_gb: 32, min: 0, max: 2,
             price_per_node_hour: 1.2}
        links:
          cloud: {bandwidth_mbps: 1000, latency_ms: 10, egress_per_gb: 0.0}
      cloud:
        kind: cloud
        provider: local
        max_data_class: internal
        storage: {root: s3://bucket/cloud}
        pools:
          - {name: cpu, cpus: 4, memory_gb: 16, min: 0, max: 8, price_per_node_hour: 0.2}
        links:
          onprem: {bandwidth_mbps: 1000, latency_ms: 10, egress_per_gb: 0.09}
      edge:
        kind: private
        provider: local
        storage:
          root: file:///tmp/hybridray-test/edge
        pools:
          - {name: cpu, cpus: 1, memory_gb: 1, count: 1, price_per_node_hour: 0.05}
        links:
          cloud: {bandwidth_mbps: 100, latency_ms: 40, egress_per_gb: 0.01}
    """)


def problems_of(text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_topology(text, label="t.yaml", overrides=overrides)
    return info.value.problems


@pytest.fixture(autouse=True)
def _unset_var(monkeypatch):
    monkeypatch.delenv(UNSET_VAR, raising=False)


# ------------------------------------------------------------------------------- bad corpus


def test_corpus_is_complete():
    names = {p.name for p in BAD_FILES}
    assert len(names) >= 25
    assert sorted(names - set(EXPECTED)) == [], "bad files without an expected message"
    assert sorted(set(EXPECTED) - names) == [], "expected messages without a bad file"


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.name)
def test_bad_file_gives_one_clear_error(path: Path):
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    problems = info.value.problems
    assert len(problems) == 1, problems
    line = problems[0]
    assert line.startswith(f"{path}: "), line
    assert EXPECTED[path.name] in line
    assert "\n" not in line
    assert not [leak for leak in LEAKS if leak in line], line
    assert str(info.value) == line


def test_too_large_file_is_refused_before_reading(tmp_path: Path):
    path = tmp_path / "large.yaml"
    path.write_text("name: big\n" + "#" * MAX_FILE_BYTES + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    assert info.value.problems == [
        f"{path}: file is {path.stat().st_size} bytes; cluster files are limited to "
        f"{MAX_FILE_BYTES} bytes"]


def test_missing_file_directory_and_binary_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file; pass a path like clusters/local.yaml"):
        load_topology(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_topology(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read the file as UTF-8 text"):
        load_topology(binary)


def test_every_problem_is_reported_at_once():
    text = BASE.replace("price_per_node_hour: 0.4", "price_per_node_hour: -1").replace(
        "kind: private", "kind: private\n    regoin: x").replace("max: 8", "max: 8, gpu: 1")
    problems = problems_of(text)
    assert len(problems) == 3, problems
    assert any("sites.onprem.pools[0].price_per_node_hour:" in p for p in problems)
    assert any("sites.edge.regoin: unknown key; did you mean 'region'?" in p for p in problems)
    assert any("sites.cloud.pools[0].gpu: unknown key; did you mean 'gpus'?" in p
               for p in problems)


def test_small_anchors_and_aliases_still_work():
    text = BASE.replace("storage: {root: s3://bucket/cloud}", "storage: &shared {root: s3://b/x}")
    text = text.replace("storage:\n      root: file:///tmp/hybridray-test/edge", "storage: *shared")
    topo = parse_topology(text)
    assert topo.sites["edge"].storage.root == topo.sites["cloud"].storage.root == "s3://b/x"


def test_quoted_non_string_key_is_accepted():
    text = BASE.replace("  edge:", '  "2":').replace("head: {site: onprem}", "head: {site: '2'}")
    assert "2" in parse_topology(text).sites


def test_base_fixture_is_valid():
    topo = parse_topology(BASE)
    assert list(topo.sites) == ["onprem", "cloud", "edge"]


# -------------------------------------------------------------------------------- overrides


def test_override_with_dots():
    topo = parse_topology(BASE, overrides=["sites.onprem.pools.0.count=2"])
    assert topo.sites["onprem"].pools[0].count == 2
    assert parse_topology(BASE).sites["onprem"].pools[0].count == 1


def test_override_with_brackets():
    topo = parse_topology(BASE, overrides=["sites.cloud.pools[0].max=16",
                                           "sites.onprem.pools[1].min=1"])
    assert topo.sites["cloud"].pools[0].max == 16
    assert topo.sites["onprem"].pools[1].min == 1


@pytest.mark.parametrize("item,key_path,value,kind", [
    ("sites.cloud.pools.0.max=3", "sites.cloud.pools.0.max", 3, int),
    ("sites.cloud.pools.0.spot=true", "sites.cloud.pools.0.spot", True, bool),
    ("sites.cloud.pools.0.price_per_node_hour=0.25", "sites.cloud.pools.0.price_per_node_hour",
     0.25, float),
    ("description=hello world", "description", "hello world", str),
    ("description=a=b", "description", "a=b", str),
    ("sites.edge.zone='7'", "sites.edge.zone", "7", str),
    ("sites.cloud.pools.0.resources={tpu: 2}", "sites.cloud.pools.0.resources", {"tpu": 2.0}, dict),
])
def test_override_values_keep_their_yaml_type(item, key_path, value, kind):
    topo = parse_topology(BASE, overrides=[item])
    got = topo
    for part in key_path.split("."):
        got = got[int(part)] if isinstance(got, list) else (
            got[part] if isinstance(got, dict) else getattr(got, part))
    assert got == value
    assert isinstance(got, kind)


def test_override_with_a_list_value(tmp_path: Path):
    text = BASE.replace("provider: local\n    max_data_class: restricted",
                        "provider: static\n    max_data_class: restricted")
    text = text.replace("count: 1, price_per_node_hour: 0.4}",
                        "count: 1, price_per_node_hour: 0.4, hosts: [h0]}")
    text = text.replace("max: 2,\n", "max: 2, hosts: [g0, g1],\n")
    parse_topology(text)  # valid as written
    topo = parse_topology(text, overrides=["sites.onprem.pools.0.count=2",
                                           "sites.onprem.pools.0.hosts=[h1, h2]"])
    assert topo.sites["onprem"].pools[0].hosts == ["h1", "h2"]


def test_override_is_validated_like_the_file():
    problems = problems_of(BASE, ("sites.onprem.pools.0.count=-1",))
    assert problems == ["t.yaml: sites.onprem.pools[0].count: Input should be greater than or "
                        "equal to 0 (got -1)"]
    problems = problems_of(BASE, ("sites.onprem.pools.0.count=many",))
    assert problems == ["t.yaml: sites.onprem.pools[0].count: Input should be a valid integer, "
                        "unable to parse string as an integer (got 'many')"]


def test_override_may_add_a_known_key():
    topo = parse_topology(BASE, overrides=["sites.edge.zone=edge-1a"])
    assert topo.sites["edge"].zone == "edge-1a"


def test_override_creating_an_unknown_key_is_refused():
    problems = problems_of(BASE, ("sites.onprem.colour=red",))
    assert len(problems) == 1
    assert problems[0].startswith("t.yaml: sites.onprem.colour: unknown key")


def test_override_creating_an_unknown_nested_key_is_refused():
    problems = problems_of(BASE, ("sites.onprem.pools.0.extra.deep=1",))
    assert len(problems) == 1
    assert problems[0].startswith("t.yaml: sites.onprem.pools[0].extra: unknown key")


def test_override_creating_a_new_site_is_validated_as_a_site():
    problems = problems_of(BASE, ("sites.new.kind=cloud",))
    assert "t.yaml: sites.new.provider: missing required key" in problems
    assert "t.yaml: sites.new.storage: missing required key" in problems


@pytest.mark.parametrize("item,message", [
    ("sites.onprem.pools.5.count=2", "sites.onprem.pools.5: no list item '5' (the list has 2)"),
    ("sites.onprem.pools[2].count=2", "sites.onprem.pools.2: no list item '2' (the list has 2)"),
    ("sites.onprem.pools.cpu.count=2", "sites.onprem.pools.cpu: no list item 'cpu'"),
    ("sites.onprem.pools.-1.count=2", "no list item '-1'"),
    ("name.first=x", "name: is a value, not a mapping or list"),
    ("sites.onprem.kind.x=1", "sites.onprem.kind: is a value, not a mapping or list"),
    ("=3", "empty key path"),
    ("no-equals-sign", "expected key.path=value"),
])
def test_bad_override_names_itself(item, message):
    problems = problems_of(BASE, (item,))
    assert len(problems) == 1
    assert problems[0].startswith(f"t.yaml: override {item!r}: ")
    assert message in problems[0]


def test_every_bad_override_is_reported_at_once():
    problems = problems_of(BASE, ("name.x=1", "sites.onprem.pools.9.count=1", "head.cpus=1"))
    assert len(problems) == 2


def test_overrides_apply_through_load_topology(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE, encoding="utf-8")
    assert load_topology(path, ["head.cpus=1"]).head.cpus == 1
    assert load_topology(path, ("head.cpus=2",)).head.cpus == 2


# ------------------------------------------------------------------------------ storage roots


def _root(root: str) -> str:
    text = BASE.replace("file:///tmp/hybridray-test/edge", root)
    return parse_topology(text).sites["edge"].storage.root


def test_file_root_expands_home(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _root("file://~/.hybridray/storage") == f"file://{tmp_path}/.hybridray/storage"


@pytest.mark.parametrize("form", ["$HYBRIDRAY_TEST_ROOT", "${HYBRIDRAY_TEST_ROOT}"])
def test_file_root_expands_environment_variables(monkeypatch, tmp_path: Path, form: str):
    monkeypatch.setenv("HYBRIDRAY_TEST_ROOT", str(tmp_path))
    assert _root(f"file://{form}/data") == f"file://{tmp_path}/data"


def test_file_root_is_made_absolute(monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    assert _root("file://data/x") == f"file://{tmp_path}/data/x"
    assert _root("file:///srv/a/../b") == "file:///srv/b"


def test_file_root_with_unset_variable_is_refused():
    problems = problems_of(BASE.replace("file:///tmp/hybridray-test/edge",
                                        f"file://${{{UNSET_VAR}}}/x"))
    assert problems == [f"t.yaml: sites.edge.storage.root: uses an environment variable that is "
                        f"not set (got 'file://${{{UNSET_VAR}}}/x')"]


def test_object_store_roots_are_not_expanded(monkeypatch):
    monkeypatch.setenv("HYBRIDRAY_TEST_ROOT", "/expanded")
    assert _root("s3://bucket/$HYBRIDRAY_TEST_ROOT") == "s3://bucket/$HYBRIDRAY_TEST_ROOT"
    assert _root("gs://bucket/~/x") == "gs://bucket/~/x"


@pytest.mark.parametrize("root", ["file://", "s3://", "gs:///", "/plain/path", "hdfs://nn/x"])
def test_root_without_scheme_or_path_is_refused(root):
    problems = problems_of(BASE.replace("file:///tmp/hybridray-test/edge", root))
    assert len(problems) == 1
    assert problems[0].startswith("t.yaml: sites.edge.storage.root: ")


def test_storage_scheme_and_path():
    topo = parse_topology(BASE)
    assert (topo.sites["cloud"].storage.scheme, topo.sites["cloud"].storage.path) == (
        "s3", "bucket/cloud")
    assert topo.sites["edge"].storage.scheme == "file"
    assert topo.sites["edge"].storage.path == "/tmp/hybridray-test/edge"


def test_endpoint_must_be_a_url():
    text = BASE.replace("storage: {root: s3://bucket/cloud}",
                        "storage: {root: s3://bucket/cloud, endpoint: minio:9000}")
    assert problems_of(text) == ["t.yaml: sites.cloud.storage.endpoint: must be http(s)://host"
                                 "[:port] (got 'minio:9000')"]
    text = text.replace("minio:9000", "http://minio:9000")
    assert parse_topology(text).sites["cloud"].storage.endpoint == "http://minio:9000"


# ------------------------------------------------------------------------------- data classes

ORDER = [DataClass.public, DataClass.internal, DataClass.confidential, DataClass.restricted]


def test_data_class_order_is_not_alphabetical():
    # Alphabetically confidential < internal < public < restricted: the trap this guards.
    assert sorted(DataClass) == ORDER
    assert sorted(reversed(ORDER)) == ORDER
    assert max(DataClass) is DataClass.restricted
    assert min(DataClass) is DataClass.public


@pytest.mark.parametrize("a,b", list(itertools.product(ORDER, ORDER)),
                         ids=lambda c: c.value)
def test_data_class_all_four_comparisons(a: DataClass, b: DataClass):
    ra, rb = ORDER.index(a), ORDER.index(b)
    assert (a < b) == (ra < rb)
    assert (a <= b) == (ra <= rb)
    assert (a > b) == (ra > rb)
    assert (a >= b) == (ra >= rb)
    assert (a == b) == (ra == rb)


@pytest.mark.parametrize("a,b", list(itertools.product(ORDER, ORDER)),
                         ids=lambda c: c.value)
def test_data_class_compared_with_a_plain_string_uses_the_same_order(a: DataClass, b: DataClass):
    ra, rb = ORDER.index(a), ORDER.index(b)
    for left, right in ((a, b.value), (a.value, b)):
        assert (left < right) == (ra < rb)
        assert (left <= right) == (ra <= rb)
        assert (left > right) == (ra > rb)
        assert (left >= right) == (ra >= rb)


@pytest.mark.parametrize("other", ["secret", "", 3, None])
def test_data_class_refuses_to_compare_with_what_is_not_a_data_class(other):
    for compare in (lambda: DataClass.public < other, lambda: other <= DataClass.public,
                    lambda: DataClass.public > other, lambda: other >= DataClass.public):
        with pytest.raises(TypeError):
            compare()


def test_data_class_is_a_string():
    assert DataClass.internal == "internal"
    assert str(DataClass.internal) == "internal"
    assert {DataClass.internal: 1}["internal"] == 1
    assert DataClass.confidential.at_least() == [DataClass.confidential, DataClass.restricted]


def test_site_without_max_data_class_holds_public_only():
    topo = parse_topology(BASE)
    edge = topo.sites["edge"]
    assert edge.max_data_class is DataClass.public
    assert edge.may_hold(DataClass.public)
    assert not edge.may_hold(DataClass.internal)
    assert not edge.may_hold("confidential")
    assert topo.sites_by_class == {
        DataClass.public: ["onprem", "cloud", "edge"],
        DataClass.internal: ["onprem", "cloud"],
        DataClass.confidential: ["onprem"],
        DataClass.restricted: ["onprem"],
    }


# -------------------------------------------------------------------------------- links, cost


def test_link_falls_back_to_the_reverse_direction():
    topo = parse_topology(BASE)
    declared = topo.sites["edge"].links["cloud"]
    assert topo.link("edge", "cloud") is declared
    assert topo.link("cloud", "edge") is declared  # declared once, applies both ways


def test_link_prefers_the_declared_direction():
    topo = parse_topology(BASE)
    assert topo.link("onprem", "cloud").egress_per_gb == 0.0
    assert topo.link("cloud", "onprem").egress_per_gb == 0.09


def test_no_link_to_self_or_between_unlinked_sites():
    topo = parse_topology(BASE)
    assert topo.link("onprem", "onprem") is None
    assert topo.link("onprem", "edge") is None
    assert topo.link("edge", "onprem") is None


def test_egress_cost():
    topo = parse_topology(BASE)
    gb = 10**9
    assert topo.egress_cost("cloud", "onprem", 100 * gb) == pytest.approx(9.0)
    assert topo.egress_cost("onprem", "cloud", 100 * gb) == 0.0
    assert topo.egress_cost("edge", "cloud", gb // 2) == pytest.approx(0.005)
    # the same link as Topology.link: declared once, priced both ways
    assert topo.egress_cost("cloud", "edge", gb) == pytest.approx(0.01)
    assert topo.egress_cost("onprem", "edge", gb) == 0.0
    assert topo.egress_cost("cloud", "cloud", gb) == 0.0


def test_link_defaults():
    link = Link(bandwidth_mbps=10, latency_ms=1)
    assert link.egress_per_gb == 0.0


def test_models_are_frozen():
    topo = parse_topology(BASE)
    with pytest.raises(ValidationError, match="frozen"):
        topo.sites["onprem"].pools[0].count = 5  # type: ignore[misc]


def test_site_lookup_names_the_choices():
    topo = parse_topology(BASE)
    assert topo.site("cloud") is topo.sites["cloud"]
    with pytest.raises(KeyError, match="unknown site 'mars'; this cluster has: onprem, cloud"):
        topo.site("mars")
