"""``hybridray demo`` refuses what its script cannot run, before starting anything (no Ray)."""

from __future__ import annotations

from hybridray.cli import main
from tests.paths import CLUSTERS


def test_a_topology_without_the_scripts_sites_is_refused_before_up(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("HYBRIDRAY_HOME", str(tmp_path))
    assert main(["demo", "--cluster-file", str(CLUSTERS / "onprem-aws.yaml")]) == 2
    err = capsys.readouterr().err
    assert "sites.cloud-a: needs max_data_class confidential" in err
    assert "Traceback" not in err
    assert not (tmp_path / "clusters").exists()          # nothing was started or recorded


def test_a_missing_cluster_file_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYBRIDRAY_HOME", str(tmp_path))
    assert main(["demo", "--cluster-file", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
