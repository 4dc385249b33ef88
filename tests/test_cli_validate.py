"""``hybridray validate``: exit codes, what goes to stdout and stderr, overrides, the bad corpus.

Runs ``hybridray.cli.main`` in-process with ``capsys``; no Ray is started.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hybridray.cli import main

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((REPO / "clusters").rglob("*.yaml"))
LOCAL = REPO / "clusters" / "local.yaml"
BAD = REPO / "tests" / "topology" / "bad"
EXPECTED: dict[str, str] = yaml.safe_load((BAD / "EXPECTED.yaml").read_text(encoding="utf-8"))
BAD_FILES = sorted(p for p in BAD.glob("*.yaml") if p.name != "EXPECTED.yaml")
LEAKS = ("Traceback", "pydantic", "For further information", "instance of", "[type=")


@pytest.fixture(autouse=True)
def _unset_var(monkeypatch):
    monkeypatch.delenv("HYBRIDRAY_TEST_UNSET_VAR", raising=False)


def validate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["validate", *args])
    out, err = capsys.readouterr()
    for leak in LEAKS:
        assert leak not in out + err
    return code, out, err


def test_shipped_files_are_ok(capsys):
    assert len(CLUSTERS) >= 3
    code, out, err = validate(capsys, *map(str, CLUSTERS))
    assert code == 0
    assert err == ""
    assert out.count(": ok (") == len(CLUSTERS)
    assert f"{LOCAL}: ok (local: 3 sites, 3 pools)" in out


def test_no_file_gives_the_documented_message_and_exit_2(capsys):
    code, out, err = validate(capsys)
    assert (code, out) == (2, "")
    assert err == "error: no cluster file given; try: hybridray validate clusters/*.yaml\n"


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.name)
def test_bad_file_exits_1_with_one_clear_line(capsys, path: Path):
    code, out, err = validate(capsys, str(path))
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert lines[-1] == "1 of 1 file(s) invalid"
    assert len(lines) == 2, err
    assert lines[0].startswith(f"{path}: ")
    assert EXPECTED[path.name] in lines[0]


def test_too_large_file(capsys, tmp_path: Path):
    path = tmp_path / "large.yaml"
    path.write_text("#" * (1 << 20) + "\nname: big\n", encoding="utf-8")
    code, out, err = validate(capsys, str(path))
    assert code == 1
    assert f"{path}: file is {path.stat().st_size} bytes; cluster files are limited to" in err


def test_all_bad_files_at_once(capsys):
    code, out, err = validate(capsys, *map(str, BAD_FILES))
    assert code == 1
    assert err.splitlines()[-1] == f"{len(BAD_FILES)} of {len(BAD_FILES)} file(s) invalid"
    lines = err.splitlines()
    assert len(lines) == len(BAD_FILES) + 1
    for path in BAD_FILES:
        assert any(line.startswith(f"{path}: ") and EXPECTED[path.name] in line
                   for line in lines), path.name


def test_one_good_one_bad(capsys):
    bad = BAD / "min_greater_than_max.yaml"
    code, out, err = validate(capsys, str(LOCAL), str(bad))
    assert code == 1
    assert out == f"{LOCAL}: ok (local: 3 sites, 3 pools)\n"
    assert err == (f"{bad}: sites.a.pools[0].max: must be >= min (got 2 < 4)\n"
                   "1 of 2 file(s) invalid\n")


def test_every_problem_of_a_file_is_printed(capsys, tmp_path: Path):
    text = LOCAL.read_text(encoding="utf-8")
    text = text.replace("price_per_node_hour: 0.40", "price_per_node_hour: -1")
    text = text.replace("zone: dc1-a", "zoen: dc1-a")
    path = tmp_path / "two-problems.yaml"
    path.write_text(text, encoding="utf-8")
    code, out, err = validate(capsys, str(path))
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 3
    assert f"{path}: sites.onprem.zoen: unknown key; did you mean 'zone'?" in err
    assert f"{path}: sites.onprem.pools[0].price_per_node_hour:" in err


def test_overrides_apply_to_every_file(capsys):
    files = [str(p) for p in CLUSTERS]
    code, out, err = validate(capsys, *files, "name=renamed", "head.cpus=1")
    assert code == 0, err
    assert out.count("ok (renamed:") == len(files)


def test_overrides_may_come_before_the_files(capsys):
    code, out, err = validate(capsys, "name=first", str(LOCAL))
    assert code == 0, err
    assert "ok (first:" in out


def test_an_override_that_breaks_every_file(capsys):
    files = [str(p) for p in CLUSTERS]
    code, out, err = validate(capsys, *files, "head.site=nowhere")
    assert code == 1
    assert out == ""
    for path in files:
        assert f"{path}: head.site: unknown site 'nowhere'" in err
    assert err.splitlines()[-1] == f"{len(files)} of {len(files)} file(s) invalid"


def test_override_that_fits_one_file_only(capsys):
    # local.yaml has a site called cloud-a; the others do not.
    code, out, err = validate(capsys, str(LOCAL), str(REPO / "clusters" / "onprem-aws.yaml"),
                              "sites.cloud-a.pools.0.count=2")
    assert code == 1
    assert f"{LOCAL}: ok (local:" in out
    assert "onprem-aws.yaml: sites.cloud-a." in err
    assert "1 of 2 file(s) invalid" in err


def test_bad_override_is_named(capsys):
    code, out, err = validate(capsys, str(LOCAL), "sites.onprem.pools.3.count=2")
    assert code == 1
    assert (f"{LOCAL}: override 'sites.onprem.pools.3.count=2': sites.onprem.pools.3: "
            "no list item '3' (the list has 1)") in err


def test_overrides_without_a_file(capsys):
    code, out, err = validate(capsys, "head.cpus=1")
    assert code == 2
    assert err == "error: no cluster file given; try: hybridray validate clusters/*.yaml\n"


def test_missing_file(capsys, tmp_path: Path):
    code, out, err = validate(capsys, str(tmp_path / "nope.yaml"), str(LOCAL))
    assert code == 1
    assert f"{tmp_path / 'nope.yaml'}: no such file" in err
    assert f"{LOCAL}: ok" in out


def test_relative_path_from_the_repo_root(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = validate(capsys, "clusters/local.yaml")
    assert code == 0
    assert out.startswith("clusters/local.yaml: ok")


def test_elastic_pools_are_explained(capsys):
    elastic = REPO / "clusters" / "elastic.yaml"
    code, out, err = validate(capsys, str(elastic))
    assert code == 0 and err == ""
    assert "  cloud-a.cpu: elastic, 0..2 nodes sized by Ray's autoscaler; an idle node stops " \
           "after 60 s\n" in out
    code, out, err = validate(capsys, str(elastic), "sites.cloud-b.pools.0.idle_timeout_s=1",
                              "sites.cloud-b.pools.0.min=1")
    assert code == 0
    assert "cloud-b.spot: elastic, 1..2 nodes sized by Ray's autoscaler; an idle node stops " \
           "after 1 s; 1 always up; note: the autoscaler looks every 2 s" in out
    code, out, err = validate(capsys, str(elastic), "sites.cloud-a.pools.0.min=2")
    assert code == 1 and "sites.cloud-a.pools[0].idle_timeout_s: min = max = 2" in err
