"""Issue 11 item 5: every topology value that becomes a Ray label or a shell word is refused at
validation unless it is Ray's label syntax (hosts: a host name or IP), with the key path and a fix.

The hostile corpus is shared with tests/deploy/test_hostile_render.py, which also proves no
rendered file ever contains one of these values.
"""

from __future__ import annotations

import pytest

from hybridray import labels as L
from hybridray.cli import main
from hybridray.exceptions import ConfigError
from hybridray.topology import load_topology
from hybridray.topology import syntax as S
from tests.paths import CLUSTERS

# Values an attacker (or a careless copy-paste) puts into a cluster file.
HOSTILE = [
    "us-east-1,hybridray.io/site=onprem,hybridray.io/max-data-class=restricted",  # label injection
    "us-east-1,hybridray.io/site=onprem",
    "a=b",
    "fra dc2",                       # a space: ray start fails later
    'x"y', "x'y", "x`id`y",           # quotes, backticks
    "$(touch /tmp/pwned)", "a$(id)", "${HOME}",
    "a\nb", "a\rb", "a\tb", "x;rm -rf /", "a|b", "a&b", "a>b", "-rf", "x" * 64,
    "ä", "a/b", "a\\b", "*",
]

# (override key template, label-ish?) for every field that becomes a label or a shell word
FIELDS = [
    ("onprem-aws.yaml", "sites.aws.region", "sites.aws.region"),
    ("onprem-aws.yaml", "sites.aws.zone", "sites.aws.zone"),
    ("onprem-aws.yaml", "sites.onprem.region", "sites.onprem.region"),
    ("onprem-aws.yaml", "sites.aws.pools.0.accelerator", "sites.aws.pools[0].accelerator"),
    ("onprem-aws.yaml", "sites.aws.pools.0.instance_type", "sites.aws.pools[0].instance_type"),
    ("onprem-aws.yaml", "sites.onprem.pools.0.hosts.1", "sites.onprem.pools[0].hosts[1]"),
    ("onprem-gke.yaml", "sites.gke.namespace", "sites.gke.namespace"),
    ("onprem-gke.yaml", "sites.gke.pools.1.node_selector",
     "sites.gke.pools[1].node_selector.cloud.google.com/machine-family"),
]


def _override(key: str, value: str) -> str:
    import json

    if key.endswith("node_selector"):
        value = {"cloud.google.com/machine-family": value}
    return f"{key}={json.dumps(value)}"  # JSON is YAML: the exact value, whatever it holds


@pytest.mark.parametrize("file,key,path", FIELDS, ids=[f[2] for f in FIELDS])
def test_every_hostile_value_is_refused_at_its_key(file, key, path):
    for value in HOSTILE:
        with pytest.raises(ConfigError) as err:
            load_topology(CLUSTERS / file, [_override(key, value)])
        lines = str(err.value).splitlines()
        assert len(lines) == 1, lines  # one problem, on one line, even for "a\nb"
        assert f"onprem-{file[7:10]}.yaml: {path}: must be" in lines[0], (value, lines)
        assert repr(value)[1:-1][:20] in lines[0], (value, lines)  # it names the value


def test_validate_cli_prints_file_key_path_and_fix(capsys):
    rc = main(["validate", str(CLUSTERS / "onprem-aws.yaml"),
               'sites.aws.region="us-east-1,hybridray.io/site=onprem"',
               'sites.onprem.region="fra dc2"',
               'sites.onprem.pools.1.hosts.0="cpu-01$(reboot)"'])
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc != 0
    lines = [li for li in text.splitlines() if "onprem-aws.yaml: " in li]
    assert any(li.endswith("e.g. fra-dc2") and ": sites.onprem.region: must be a Ray label value"
               in li for li in lines), text
    assert any(": sites.aws.region: must be a Ray label value" in li for li in lines), text
    assert any(": sites.onprem.pools[1].hosts[0]: must be a host name" in li for li in lines)


def test_good_values_pass():
    for value in ("us-east-1", "fra-dc2", "A100-80GB", "p5.48xlarge", "n2-standard-8", "L40S",
                  "europe-west4-a", ""):
        assert S.label_value_problem(value) is None, value
    for host in ("gpu-a100-01.dc2.example.internal", "10.0.0.7", "fd00::1", "localhost",
                 "h1"):
        assert S.host_problem(host) is None, host
    for host in ("10.0.0.256.1", "a..b", "-a.b", "a_b.c", "1.2.3.999"):
        assert S.host_problem(host) is not None, host
    assert S.host_port_problem("10.0.0.5:6379") is None
    assert S.host_port_problem("[fd00::1]:6379") is None
    assert S.host_port_problem("10.0.0.5:99999") is not None
    assert S.host_port_problem("10.0.0.5; rm -rf /") is not None


def test_the_mirrored_syntax_agrees_with_the_installed_rays():
    from ray._private.label_utils import validate_label_key, validate_label_value

    for value in [*HOSTILE, "us-east-1", "fra-dc2", "A100", "a" * 63, "a_b.c-d", ""]:
        try:
            validate_label_value(value)
            ray_ok = True
        except ValueError:
            ray_ok = False
        assert ray_ok == (S.label_value_problem(value) is None), value
    for key in ["hybridray.io/site", "ray.io/region", "a b", "x/y/z", "-a/b", "a.b/c_d",
                "hybridray.io/site=onprem", "k"]:
        assert (validate_label_key(key) is None) == (S.label_key_problem(key) is None), key


def test_labels_arg_is_safe_by_construction():
    good = {"hybridray.io/site": "aws", "ray.io/region": "us-east-1"}
    assert L.labels_arg(good) == "hybridray.io/site=aws,ray.io/region=us-east-1"
    for bad in ({"ray.io/region": "us-east-1,hybridray.io/site=onprem"},
                {"ray.io/region": "fra dc2"}, {"a,b": "c"}, {"k": "v\nw"}):
        with pytest.raises(ConfigError, match="node label"):
            L.labels_arg(bad)
    # and Ray parses what it builds into exactly the labels given
    from ray._private.label_utils import parse_node_labels_string

    topology = load_topology(CLUSTERS / "onprem-aws.yaml")
    for site in topology.sites:
        for pool in topology.sites[site].pools:
            labels = L.node_labels(topology, site, pool)
            assert parse_node_labels_string(L.labels_arg(labels)) == labels
