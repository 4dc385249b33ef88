"""Rendered shell scripts: shellcheck clean (warnings included), injection-proof, and the join
script's service loop (issue 12 items 7 and 9; issue 10 needs the loop). No Ray needed: a
stand-in ``ray`` executable records how it was called."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hybridray.deploy.common import RenderOptions
from hybridray.deploy.mint import NODE_CERT_SH
from hybridray.deploy.render import build, render
from hybridray.exceptions import ConfigError, DeployError
from hybridray.topology import load_topology
from tests.deploy.conftest import AWS_OPTIONS, shellcheck_or_skip
from tests.paths import CLUSTERS
from tests.topology.test_label_safety import HOSTILE

EXAMPLES = sorted(CLUSTERS.rglob("*.yaml"))
OPTIONS = [RenderOptions(gcp_project="p", **AWS_OPTIONS),
           RenderOptions(gcp_project="p", tls=False, head_address="10.0.0.5:6379",
                         **AWS_OPTIONS)]


def _scripts(rendered) -> dict[str, str]:
    out = {rel: text for rel, text in rendered.files.items() if rel.endswith(".sh")}
    out["cluster.env"] = rendered.files.get("cluster.env", "")
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_rendered_script_is_shellcheck_clean(path, tmp_path):
    shellcheck = shellcheck_or_skip()
    topology = load_topology(path)
    files = []
    for i, options in enumerate(OPTIONS):
        for rel, text in _scripts(build(topology, options)).items():
            if not text or rel == "cluster.env":
                continue
            f = tmp_path / str(i) / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
            files.append(f)
    # the KubeRay init container runs the same POSIX script
    (tmp_path / "node-cert.sh").write_text(NODE_CERT_SH)
    files.append(tmp_path / "node-cert.sh")
    proc = subprocess.run([shellcheck, "--severity=style", "-x", *map(str, files)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:]
    for options in OPTIONS:  # sourced by every script: plain, quoted assignments
        f = tmp_path / "cluster.env"
        f.write_text(build(topology, options).files.get("cluster.env", ""))
        if not f.read_text():
            continue
        proc = subprocess.run([shellcheck, "--severity=style", str(f)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_hostile_values_never_reach_a_rendered_file():
    """Every hostile value is refused at validation (ConfigError) or by RenderOptions
    (DeployError): build never returns files that contain one."""
    keys = ["sites.aws.region", "sites.aws.zone", "sites.onprem.region",
            "sites.aws.pools.0.accelerator", "sites.aws.pools.0.instance_type",
            "sites.onprem.pools.0.hosts.0"]
    for value in HOSTILE:
        for key in keys:
            with pytest.raises(ConfigError):
                load_topology(CLUSTERS / "onprem-aws.yaml", [f"{key}={json.dumps(value)}"])
        with pytest.raises(ConfigError):
            load_topology(CLUSTERS / "onprem-gke.yaml",
                          [f"sites.gke.namespace={json.dumps(value)}"])
        with pytest.raises(DeployError, match="--head-address"):
            RenderOptions(head_address=value)
        with pytest.raises(DeployError, match="--head-address"):
            RenderOptions(head_address=f"10.0.0.5:6379{value}")
    for flag, field in (("--aws-subnet", "aws_subnets"), ("--aws-ami", "aws_ami"),
                        ("--ssh-private-key", "ssh_private_key"), ("--image", "image")):
        value = ("subnet-0a1b2c3d4e5f60718 $(id)",) if field == "aws_subnets" else "x $(id)"
        with pytest.raises(DeployError, match=flag):
            RenderOptions(**{field: value})
    # and what renders quotes what it prints: the README's kubectl lines, cluster.env
    rendered = build(load_topology(CLUSTERS / "onprem-gke.yaml"),
                     RenderOptions(head_address="10.0.0.5"))
    assert "kubectl -n ml-burst create configmap onprem-gke-head --from-literal=" \
           "address=10.0.0.5:6379" in rendered.files["README.md"]
    env = build(load_topology(CLUSTERS / "local.yaml"),
                RenderOptions(head_address="10.0.0.5")).files["cluster.env"]
    assert 'HYBRIDRAY_HEAD_ADDRESS="10.0.0.5:6379"' in env


FAKE_RAY = """#!/bin/sh
echo "$*" >> "$CALLS"
trap 'echo TERM >> "$CALLS"; exit 0' TERM
if [ "${FAKE_BLOCK:-0}" = 1 ]; then
  while :; do sleep 0.1; done
fi
exit 3
"""


def _loop_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "token").write_text("t" * 64)
    ray = tmp_path / "ray"
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)
    return {"PATH": os.environ["PATH"], "HYBRIDRAY_CONF": str(tmp_path / "none.env"),
            "HYBRIDRAY_TOKEN_FILE": str(tmp_path / "token"), "HYBRIDRAY_RAY": str(ray),
            "HYBRIDRAY_HEAD_ADDRESS": "10.77.0.1:6379", "HYBRIDRAY_NODE_IP": "10.77.0.2",
            "HYBRIDRAY_TEMP_DIR": str(tmp_path / "ray-tmp"), "CALLS": str(tmp_path / "calls"),
            "HYBRIDRAY_RESTART_DELAY": "0", **extra}


def _calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_the_join_script_is_a_service_loop_that_restarts_ray(tmp_path):
    render(load_topology(CLUSTERS / "onprem-aws.yaml"), tmp_path / "out",
           RenderOptions(tls=False, **AWS_OPTIONS))
    script = tmp_path / "out" / "onprem" / "join-cpu-2.sh"
    proc = subprocess.Popen(["bash", str(script)], env=_loop_env(tmp_path),
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(_calls(tmp_path)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_calls(tmp_path)) >= 3  # ray exited 3 times, was started again each time
        assert proc.poll() is None         # and the loop is still there
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
    assert rc == 0
    assert "ray start exited (3); starting again" in proc.stderr.read()
    args = _calls(tmp_path)[0].split()
    assert args[:3] == ["start", "--address", "10.77.0.1:6379"] and "--block" in args
    assert args[args.index("--node-ip-address") + 1] == "10.77.0.2"
    assert args[args.index("--temp-dir") + 1] == str(tmp_path / "ray-tmp")
    assert "hybridray.io/site=onprem" in args[args.index("--labels") + 1]


def test_sigterm_reaches_ray_and_once_mode_returns_its_status(tmp_path):
    rendered = render(load_topology(CLUSTERS / "local.yaml"), tmp_path / "out",
                      RenderOptions(tls=False))
    script = tmp_path / "out" / "cloud-b" / "join-spot-0.sh"
    proc = subprocess.Popen(["bash", str(script)], env=_loop_env(tmp_path, FAKE_BLOCK="1"),
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while not _calls(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert _calls(tmp_path)[-1] == "TERM"  # the blocking ray start was told to stop
    once = subprocess.run(["bash", str(script)], env=_loop_env(tmp_path, HYBRIDRAY_ONCE="1"),
                          capture_output=True, text=True, timeout=30)
    assert once.returncode == 3  # the stand-in ray's status, no restart
    assert "cloud-b/join-spot-0.sh" in rendered.files


def test_local_site_scripts_do_not_collide_and_name_the_certificates_certs_writes(tmp_path):
    """Item 7: one machine, four scripts: no pinned node ports, and each site's scripts expect
    nodes/local-SITE.crt, which hybridray certs writes."""
    from hybridray.deploy.secrets import make_secrets

    topology = load_topology(CLUSTERS / "local.yaml")
    rendered = build(topology, RenderOptions())
    make_secrets(topology, tmp_path / "s", head="127.0.0.1")
    made = {p.name for p in (tmp_path / "s" / "nodes").glob("*.crt")}
    for rel, text in rendered.files.items():
        if "/join-" not in rel:
            continue
        assert "--node-manager-port" not in text and "--min-worker-port" not in text, rel
        site = rel.split("/")[0]
        assert f"$TLS_DIR/local-{site}.crt" in text and f"local-{site}.crt" in made
    head = rendered.files["onprem/head.sh"]
    assert "--port 6379" in head and "$TLS_DIR/head.crt" in head and "head.crt" in made
