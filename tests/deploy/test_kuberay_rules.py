"""Issue 12 items 3-6 and 8: what the KubeRay v1.7.0 operator does with a rendered RayCluster,
encoded as tests. Each rule cites the operator's source file (ray-project/kuberay at tag
ray-operator/v1.7.0) it comes from; no KubeRay code is copied here."""

from __future__ import annotations

import pytest
import yaml

from hybridray.deploy.common import RenderOptions
from hybridray.deploy.kuberay import AUTH_TOKEN_KEY, head_service_names
from hybridray.deploy.render import build
from hybridray.topology import load_topology
from tests.paths import CLUSTERS

RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")


@pytest.fixture(params=[None, "10.9.8.7"], ids=["configmap-head", "head-address"])
def manifests(request):
    topology = load_topology(CLUSTERS / "onprem-gke.yaml")
    rendered = build(topology, RenderOptions(head_address=request.param))
    return topology, {site: yaml.safe_load(rendered.files[rel])
                      for site, rel in rendered.rayclusters.items()}


def _groups(manifest):
    spec = manifest["spec"]
    return [("Head", spec["headGroupSpec"])] + [(g["groupName"], g)
                                                 for g in spec["workerGroupSpecs"]]


def test_resources_are_set_in_one_place(manifests):
    # utils/validation.go, validateRayGroupResources: "resource fields should not be set in
    # both rayStartParams and Resources" -> the operator creates no pods for the cluster.
    _, by_site = manifests
    for manifest in by_site.values():
        for name, group in _groups(manifest):
            if group.get("resources"):
                assert not [k for k in RESOURCE_PARAMS if group["rayStartParams"].get(k)], name
            # utils/validation.go, validateRayGroupLabels: labels only in the Labels field
            assert "labels" not in group["rayStartParams"], name


def test_group_resources_become_the_ray_start_flags_hybridray_declares(manifests):
    # common/pod.go, updateRayStartParamsResources: "CPU" -> --num-cpus, "memory" ->
    # --memory, keys ending in "gpu" (utils/resources.go IsGPUResourceKey) -> --num-gpus,
    # the rest -> --resources JSON; quantities go through resource.ParseQuantity.
    topology, by_site = manifests
    for site, manifest in by_site.items():
        for pool, group in zip(topology.sites[site].pools, manifest["spec"]["workerGroupSpecs"],
                               strict=True):
            res = group["resources"]
            assert res["CPU"] == str(int(pool.cpus))
            assert res.get("GPU", "0") == str(pool.gpus)
            assert res["memory"] == str(int(pool.memory_gb * 2**30))
            assert res[f"site:{site}"] == "1000"
            assert all(v.isdigit() for v in res.values())  # valid Kubernetes quantities


def test_token_auth_goes_through_auth_options(manifests):
    # common/pod.go, SetContainerTokenAuthEnvVars: with authOptions.mode token the operator
    # sets RAY_AUTH_MODE and RAY_AUTH_TOKEN (secretKeyRef, key "auth_token" from
    # utils/constant.go RAY_AUTH_TOKEN_SECRET_KEY) in the Ray container, the autoscaler
    # sidecar (DefaultHeadPodTemplate) and wait-gcs-ready (configureTokenAuth); a variable
    # already set by the user is kept, so hybridray sets neither itself.
    # utils/validation.go: token mode needs rayVersion >= 2.52.0.
    topology, by_site = manifests
    assert AUTH_TOKEN_KEY == "auth_token"
    for manifest in by_site.values():
        spec = manifest["spec"]
        assert spec["authOptions"] == {"mode": "token",
                                       "secretName": f"{topology.name}-ray-token"}
        major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
        assert (major, minor) >= (2, 52)
        for _, group in _groups(manifest):
            env = {e["name"] for e in group["template"]["spec"]["containers"][0]["env"]}
            assert not env & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


def test_the_autoscaler_sidecar_gets_tls_and_runs_v2(manifests):
    # common/pod.go, DefaultHeadPodTemplate: TLS reaches the sidecar only through
    # SetContainerTLSConfig when tlsOptions is enabled, which needs the RayClusterMTLS feature
    # gate (pkg/features/features.go, default false; utils/validation.go refuses tlsOptions
    # without it). So hybridray's own TLS goes to the sidecar via autoscalerOptions.env and
    # volumeMounts (mergeAutoscalerOverrides appends them), and never sets tlsOptions.
    # utils/util.go IsAutoscalingV2Enabled: autoscalerOptions.version v2.
    _, by_site = manifests
    for manifest in by_site.values():
        spec = manifest["spec"]
        assert "tlsOptions" not in spec and spec["enableInTreeAutoscaling"] is True
        auto = spec["autoscalerOptions"]
        assert auto["version"] == "v2"
        env = {e["name"]: e.get("value") for e in auto["env"]}
        head_env = {e["name"]: e.get("value") for e in
                    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        for var in ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY",
                    "RAY_TLS_CA_CERT"):
            assert env[var] == head_env[var], var
        volumes = {v["name"] for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]}
        assert {m["name"] for m in auto["volumeMounts"]} <= volumes
        # utils/validation.go: autoscalerOptions.env must not set KUBERAY_GEN_AUTOSCALER_START_CMD
        assert "KUBERAY_GEN_AUTOSCALER_START_CMD" not in env
        # v2 wants restartPolicy Never or unset on head and workers
        for _, group in _groups(manifest):
            assert group["template"]["spec"].get("restartPolicy") in (None, "Never")


def test_a_remote_site_is_scaled_for_the_real_heads_demand(manifests):
    # Item 6. ray/scripts/scripts.py (installed Ray) `ray kuberay-autoscaler --gcs-address`;
    # common/pod.go BuildAutoscalerContainer exports KUBERAY_GEN_AUTOSCALER_START_CMD for
    # custom args to extend; utils/validation.go needs min/maxReplicas when autoscaling is off.
    topology, by_site = manifests
    gke = by_site["gke"]["spec"]
    args = gke["autoscalerOptions"]["args"]
    assert len(args) == 1 and args[0].startswith("$KUBERAY_GEN_AUTOSCALER_START_CMD "
                                                 "--gcs-address ")
    for group in gke["workerGroupSpecs"]:
        assert group["rayStartParams"]["address"] in args[0]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > 0
    assert "args" not in by_site["onprem"]["spec"]["autoscalerOptions"]


def test_ports_are_pinned_as_the_readme_says(manifests):
    # Item 7. common/pod.go, setMissingRayStartParams: metrics-export-port defaults to 8080
    # and dashboard-agent-listen-port to 52365 when absent; hybridray pins every port.
    from hybridray.deploy import network

    _, by_site = manifests
    for manifest in by_site.values():
        for name, group in _groups(manifest):
            p = group["rayStartParams"]
            assert p["metrics-export-port"] == str(network.METRICS_EXPORT), name
            assert p["node-manager-port"] == str(network.NODE_MANAGER), name
            assert p["min-worker-port"] == str(network.MIN_WORKER_PORT), name
        assert manifest["spec"]["headGroupSpec"]["rayStartParams"]["port"] == str(network.GCS)


def test_pods_mint_certificates_with_their_sites_ca_for_the_names_they_are_dialled_by(
        manifests):
    # Items 4-5. The init container: the site CA Secret mounted read-only and readable by the
    # image's non-root user (defaultMode 0444), only in the init container; no ca.srl written
    # (random serial); SANs: pod IP, host name, the head Service names (utils/util.go
    # GenerateHeadServiceName: NAME-head-svc; GenerateFQDNServiceName: .NS.svc.DOMAIN) and,
    # on the head, --head-address. wait-gcs-ready copies the Ray container's env and mounts
    # (common/pod.go DefaultWorkerPodTemplate), so it sees the minted files too.
    topology, by_site = manifests
    for site, manifest in by_site.items():
        head = manifest["spec"]["headGroupSpec"]["template"]["spec"]
        init = head["initContainers"][0]
        sans = init["command"][6:]
        assert set(head_service_names(topology, site)) <= set(sans)
        for _, group in _groups(manifest):
            pod = group["template"]["spec"]
            ca = next(v for v in pod["volumes"] if "secret" in v)
            assert ca["secret"]["defaultMode"] == 0o444
            assert ca["secret"]["secretName"] == f"{topology.name}-{site}-ray-ca"
            ray_mounts = {m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert ca["name"] not in ray_mounts  # the site key stays in the init container
            assert "-CAcreateserial" not in " ".join(pod["initContainers"][0]["command"])
            assert pod["initContainers"][0]["env"][0]["valueFrom"]["fieldRef"][
                "fieldPath"] == "status.podIP"


def test_gpu_groups_use_rays_gpu_image(manifests):
    # Item 8: rayproject/ray:VERSION is the CPU image; GPU pods need VERSION-gpu.
    topology, by_site = manifests
    for site, manifest in by_site.items():
        for pool, group in zip(topology.sites[site].pools, manifest["spec"]["workerGroupSpecs"],
                               strict=True):
            images = {c["image"] for c in group["template"]["spec"]["containers"]
                      + group["template"]["spec"]["initContainers"]}
            assert all(i.endswith("-gpu") == bool(pool.gpus) for i in images), images


def test_raycluster_names_follow_the_operators_metadata_rule():
    # utils/validation.go ValidateRayClusterMetadata: at most MaxRayClusterNameLength (53,
    # utils/constant.go) characters and a DNS-1035 label (starts with a letter).
    from hybridray.exceptions import DeployError
    from hybridray.topology.loader import parse_topology

    text = (CLUSTERS / "onprem-gke.yaml").read_text()
    long_site = text.replace("\n  gke:\n", "\n  gke-europe-west4-burst-spot-pool:\n").replace(
        "      gke: {", "      gke-europe-west4-burst-spot-pool: {")
    for topology, bad in ((parse_topology(long_site, overrides=["name=" + "a" * 30]), True),
                          (load_topology(CLUSTERS / "onprem-gke.yaml", ["name=1cluster"]), True),
                          (load_topology(CLUSTERS / "onprem-gke.yaml"), False)):
        if bad:
            with pytest.raises(DeployError, match="must be at most 53 characters and start "
                                                  "with a letter"):
                build(topology, RenderOptions())
        else:
            for rel in build(topology, RenderOptions()).rayclusters.values():
                assert len(yaml.safe_load(build(topology, RenderOptions()).files[rel])[
                    "metadata"]["name"]) <= 53
