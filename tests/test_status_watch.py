"""``hybridray status NAME --watch``: the live view, rendered from a recorded cluster."""

from __future__ import annotations

import pytest

from hybridray.cli import main
from tests.recorded import make_recorded


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDRAY_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "160")
    return make_recorded(tmp_path)


def test_watch_shows_sites_utilisation_work_bytes_and_cost(home, capsys):
    assert main(["status", "m1", "--watch", "--count", "2", "--interval", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "cluster m1 is down" in out           # its head is gone
    assert "cost rate $0.34/h" in out            # only cloud-a's node runs
    for text in ("cloud-a", "cloud-b", "utilisation", "training", "r1", "service", "embed",
                 "onprem:t → cloud-a:t", "committed", "3.0 GB", "0.3600"):
        assert text in out, text


@pytest.mark.parametrize("argv, message", [
    (["status", "--watch"], "hybridray status NAME --watch"),
    (["status", "m1", "--watch", "--json"], "without --json"),
    (["status", "nope", "--watch"], "no cluster named 'nope'"),
    (["status", "m1", "--watch", "--interval", "0"], "must be at least 0.2 seconds"),
    (["status", "m1", "--watch", "--count", "0"], "must be at least 1"),
])
def test_watch_refuses_bad_input_with_one_clear_line(home, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
