"""hybridray submit: the command line, without a cluster (the real job runs in
test_on_cluster.py)."""

from __future__ import annotations

import pytest

from hybridray.cli import main


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDRAY_HOME", str(tmp_path))
    monkeypatch.delenv("HYBRIDRAY_CLUSTER", raising=False)
    return tmp_path


@pytest.mark.parametrize("argv,message", [
    (["submit", "--cluster", "local", "--site", "cloud-b"], "entrypoint after --"),
    (["submit", "--site", "cloud-b", "--", "python", "x.py"], "name the cluster: --cluster"),
    (["submit", "--cluster", "nope", "--", "python", "x.py"], "no cluster named 'nope'"),
])
def test_submit_says_what_is_missing(argv, message, empty_home, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_options_before_the_entrypoint_are_the_commands_and_the_rest_is_the_jobs(empty_home):
    from hybridray.cli import build_parser

    args = build_parser().parse_args(["submit", "--cluster", "c", "--site", "cloud-b", "--",
                                      "python", "-u", "x.py", "--site", "other"])
    assert args.cluster == "c" and args.site == "cloud-b"
    assert args.entrypoint[-5:] == ["python", "-u", "x.py", "--site", "other"]
