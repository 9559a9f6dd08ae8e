"""The Kubernetes manifests in deploy/k8s: every overlay renders, validates strictly against the
Kubernetes OpenAPI schemas (built-in kinds, via kubernetes-validate) and the CRD schemas shipped in
deploy/k8s/schemas (ServiceMonitor, PrometheusRule, ScaledObject, via jsonschema), and keeps the invariants the
deployment relies on (probes, limits, PDBs, non-root, only the gateway exposed and admitted to the
stages, no :latest, the model read-only, autoscaling consistent with the gateway's slots, the gateway as
stateless replicas on a shared PostgreSQL named by a Secret, the dev database only where it belongs, the
alerts and the Grafana dashboard shipped with the scrape).

Rendering: the real kustomize (``kubectl kustomize``) when one is on PATH, else the small fallback
renderer in tests/k8s_render.py, which implements only the kustomize features deploy/k8s uses; when
both exist, a test checks they produce the same objects. No cluster is needed or contacted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.k8s_render import (K8S, REPO, RenderError, config_map_hash, kustomize_command, render, render_fallback,
                              renderer_name)

# The Kubernetes minors the manifests must validate against: the newest whose schemas
# kubernetes-validate (pinned in pyproject.toml) ships, and the oldest minor we support (1.31: native
# gRPC probes and PDB unhealthyPodEvictionPolicy are GA there).
K8S_VERSIONS = ("1.37", "1.31")
OVERLAYS = ("overlays/gpu", "overlays/gpu-hpa", "overlays/gpu-cfg-parallel", "overlays/cpu-dev")
GPU_OVERLAYS = ("overlays/gpu", "overlays/gpu-hpa", "overlays/gpu-cfg-parallel")
OTHERS = ("model-loader", "rbac")
STAGES = {"text-encoder": 50051, "denoiser": 50052, "decoder": 50053}
SERVICES = {**STAGES, "gateway": 50050}
COMPONENT = "app.kubernetes.io/component"
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
               ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
               ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json"}
MONITORING = K8S / "components" / "monitoring"
DASHBOARD_LABEL = {"grafana_dashboard": "1"}     # what Grafana's dashboard sidecar (kube-prometheus-stack) watches
MODEL_MOUNT = "/models"
GATEWAY_REPLICAS = 3
JOB_STORE_SECRET = "t2v-job-store"          # key "url": T2V_JOB_STORE, the gateway's PostgreSQL
DEV_DATABASE = "components/postgres-dev"    # a PostgreSQL for laptops; only overlays/cpu-dev includes it
DEV_OVERLAYS = ("overlays/cpu-dev",)
DEV_DATABASE_SECRETS = {"postgres-dev", JOB_STORE_SECRET}
POSTGRES_PORT = 5432


# --- helpers -----------------------------------------------------------------------------------------

def objects(path: str) -> list[dict[str, Any]]:
    return render(K8S / path)


def of_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, pod template metadata, pod spec) of every object that runs pods."""
    for o in objs:
        if o["kind"] == "Pod":
            yield o["metadata"]["name"], o["metadata"], o["spec"]
        elif o["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield o["metadata"]["name"], o["spec"]["template"]["metadata"], o["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def env_of(objs: list[dict[str, Any]], deployment: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env."""
    config_maps = of_kind(objs, "ConfigMap")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "<from " + json.dumps(variable.get("valueFrom")) + ">")
    return env


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels + matchExpressions) against a set of labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        if op == "In" and labels.get(key) not in values or op == "NotIn" and labels.get(key) in values \
                or op == "Exists" and key not in labels or op == "DoesNotExist" and key in labels:
            return False
    return True


_UNITS = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def pods_of(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Component name -> the labels of its pods (Deployments and StatefulSets: the dev database too)."""
    return {d["spec"]["template"]["metadata"]["labels"][COMPONENT]: d["spec"]["template"]["metadata"]["labels"]
            for kind in ("Deployment", "StatefulSet") for d in of_kind(objs, kind).values()}


# --- rendering and schemas ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", OVERLAYS + OTHERS + ("base",))
def test_every_kustomization_renders(path: str) -> None:
    objs = objects(path)
    assert objs, f"{path} rendered nothing with {renderer_name()}"
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), f"{path}: duplicate objects"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", OVERLAYS + OTHERS)
def test_builtin_objects_validate_strictly_against_the_kubernetes_schemas(path: str, version: str) -> None:
    for o in objects(path):
        if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path}: {o['kind']}/{o['metadata']['name']} is not a valid Kubernetes {version} object: "
                        f"{error.message} at {'.'.join(map(str, error.path))}")


def test_strict_validation_catches_a_misspelt_field_and_a_wrong_type() -> None:
    """The check above is worth something only if it fails on the mistakes people make."""
    deployment = json.loads(json.dumps(of_kind(objects("overlays/gpu"), "Deployment")["denoiser"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50052}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    deployment = json.loads(json.dumps(of_kind(objects("overlays/gpu"), "Deployment")["denoiser"]))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[(api_version, kind)]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", GPU_OVERLAYS)
def test_custom_resources_validate_against_their_crd_schemas(path: str) -> None:
    found = [o for o in objects(path) if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS]
    assert {"ServiceMonitor", "PrometheusRule"} <= {o["kind"] for o in found}
    for o in found:
        errors = [f"{e.message} at {'.'.join(map(str, e.path))}"
                  for e in crd_validator(o["apiVersion"], o["kind"]).iter_errors(o)]
        assert not errors, f"{path}: {o['kind']}/{o['metadata']['name']}: {errors}"
    unknown = {(o["apiVersion"], o["kind"]) for o in objects(path)
               if "." in o["apiVersion"].split("/")[0] and not o["apiVersion"].endswith(".k8s.io/v1")} \
        - set(CRD_SCHEMAS)
    assert not unknown, f"custom resources without a schema in deploy/k8s/schemas: {unknown}"


def test_crd_schemas_catch_misspelt_fields() -> None:
    scaled = json.loads(json.dumps(of_kind(objects("overlays/gpu"), "ScaledObject")["denoiser"]))
    scaled["spec"]["triggers"][0]["metadata"]["treshold"] = scaled["spec"]["triggers"][0]["metadata"].pop("threshold")
    scaled["spec"]["maxReplicas"] = 4
    messages = [e.message for e in crd_validator("keda.sh/v1alpha1", "ScaledObject").iter_errors(scaled)]
    assert any("treshold" in m for m in messages) and any("maxReplicas" in m for m in messages), messages
    monitor = json.loads(json.dumps(of_kind(objects("overlays/gpu"), "ServiceMonitor")["t2v-mesh"]))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert list(crd_validator("monitoring.coreos.com/v1", "ServiceMonitor").iter_errors(monitor))
    rules = of_kind(objects("overlays/gpu"), "PrometheusRule")["t2v-mesh"]
    validator = crd_validator("monitoring.coreos.com/v1", "PrometheusRule")
    for mistake in ({"fro": "10m"}, {"for": "10 minutes"}, {"record": "also:a_record"}):
        broken = json.loads(json.dumps(rules))
        alert = next(r for r in broken["spec"]["groups"][0]["rules"] if "alert" in r)
        if "fro" in mistake:
            alert["fro"] = alert.pop("for")
        else:
            alert.update(mistake)
        assert list(validator.iter_errors(broken)), mistake


@pytest.mark.skipif(kustomize_command() is None, reason="no kustomize or kubectl on PATH to compare with")
@pytest.mark.parametrize("path", OVERLAYS + OTHERS)
def test_fallback_renderer_matches_kustomize(path: str) -> None:
    def key(o: dict[str, Any]) -> tuple[str, str, str]:
        return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]

    real = sorted(objects(path), key=key)
    ours = sorted(render_fallback(K8S / path), key=key)
    assert [key(o) for o in ours] == [key(o) for o in real]
    for mine, theirs in zip(ours, real):
        assert mine == theirs, f"{path}: {key(theirs)} differs from {renderer_name()}'s"


def test_config_map_hash_is_kustomizes() -> None:
    """Values that kubectl kustomize (kustomize v5.5.0) printed for these ConfigMaps."""
    assert config_map_hash({"data": {"T2V_GRACE_SECONDS": "20"}}) == "f97ffctk8b"
    assert config_map_hash({"data": {"T2V_GRACE_SECONDS": "10"}}) == "kd7fddfh7b"


def test_fallback_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {team: a}\n")
    with pytest.raises(RenderError, match="commonLabels"):
        render_fallback(tmp_path)


# --- invariants --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", OVERLAYS)
def test_every_service_has_a_deployment_a_service_and_a_pdb(path: str) -> None:
    objs = objects(path)
    deployments, services, budgets = of_kind(objs, "Deployment"), of_kind(objs, "Service"), \
        of_kind(objs, "PodDisruptionBudget")
    dev_database = {"postgres-dev"} if path in DEV_OVERLAYS else set()
    assert set(deployments) == set(SERVICES) and set(services) == set(SERVICES) | dev_database
    for name in SERVICES:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert selects(deployments[name]["spec"]["selector"], labels)
        assert selects({"matchLabels": services[name]["spec"]["selector"]}, labels)
        guarding = [b for b in budgets.values() if selects(b["spec"]["selector"], labels)]
        assert len(guarding) == 1, f"{path}: {name} needs exactly one PodDisruptionBudget, has {len(guarding)}"
        assert guarding[0]["spec"].get("maxUnavailable") == 1, "one voluntary disruption at a time, and drainable"


@pytest.mark.parametrize("path", OVERLAYS)
def test_probes_are_grpc_health_checks_on_the_service_port(path: str) -> None:
    objs = objects(path)
    services = of_kind(objs, "Service")
    for name, deployment in of_kind(objs, "Deployment").items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        port = SERVICES[name]
        assert env_of(objs, deployment)["T2V_PORT"] == str(port)
        assert {"name": "grpc", "containerPort": port, "protocol": "TCP"} in container["ports"]
        assert any(p["name"] == "grpc" and p["port"] == port for p in services[name]["spec"]["ports"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, f"{path}: {name} {probe} must be a native gRPC probe"
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        least = 1200 if name == "denoiser" and path in GPU_OVERLAYS else 300
        assert budget >= least, f"{path}: {name} gives its model only {budget} s to load"
        live = container["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 60, "a busy GPU must not get the pod killed"


@pytest.mark.parametrize("path", OVERLAYS + ("model-loader",))
def test_every_container_has_requests_and_limits(path: str) -> None:
    for name, _, spec in pod_specs(objects(path)):
        for container in containers(spec):
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request, limit = resources.get("requests", {}).get(resource), resources.get("limits", {}).get(resource)
                assert request and limit, f"{path}: {name}/{container['name']} lacks a {resource} request or limit"
                assert quantity(request) <= quantity(limit)


@pytest.mark.parametrize("path", GPU_OVERLAYS)
def test_each_stage_has_a_gpu_on_its_own_pool(path: str) -> None:
    objs = objects(path)
    for name, deployment in of_kind(objs, "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        limits = spec["containers"][0]["resources"]["limits"]
        if name == "gateway":
            assert "nvidia.com/gpu" not in limits and "nodeSelector" not in spec
            continue
        cfg_parallel = path.endswith("cfg-parallel") and name == "denoiser"
        assert limits["nvidia.com/gpu"] == (2 if cfg_parallel else 1)
        assert (env_of(objs, deployment).get("T2V_CFG_PARALLEL") == "true") == cfg_parallel
        assert spec["nodeSelector"] == {"t2v-mesh/pool": name}
        tolerated = {(t["key"], t.get("value")) for t in spec["tolerations"]}
        assert ("nvidia.com/gpu", None) in tolerated and ("t2v-mesh/pool", name) in tolerated
        assert env_of(objs, deployment)["T2V_DEVICE"] == "cuda"


def test_the_cpu_dev_overlay_asks_for_no_gpu() -> None:
    objs = objects("overlays/cpu-dev")
    for name, _, spec in pod_specs(objs):
        assert "nodeSelector" not in spec and "tolerations" not in spec
        assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in containers(spec))
    assert all(env_of(objs, d)["T2V_DEVICE"] == "cpu" for d in of_kind(objs, "Deployment").values())
    assert "t2v-models" not in of_kind(objs, "PersistentVolumeClaim")


@pytest.mark.parametrize("path", OVERLAYS + ("model-loader",))
def test_pods_run_non_root_with_a_read_only_root_filesystem(path: str) -> None:
    for name, _, spec in pod_specs(objects(path)):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0 and pod["runAsGroup"] != 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert not any("hostPath" in v for v in volumes.values())
        for container in containers(spec):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and not context.get("privileged")
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{path}: {name} needs a writable /tmp"


@pytest.mark.parametrize("path", OVERLAYS)
def test_only_the_gateway_is_exposed(path: str) -> None:
    objs = objects(path)
    services = of_kind(objs, "Service")
    for name in STAGES:
        assert services[name]["spec"].get("clusterIP") == "None", f"{name} must be headless (client-side balancing)"
        assert services[name]["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert services["gateway"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert {p["name"] for p in services["gateway"]["spec"]["ports"]} == {"grpc", "http", "metrics"}
    assert not [o for o in objs if o["kind"] in {"Ingress", "Gateway", "HTTPRoute", "GRPCRoute"}]
    # The gateway is the one pod anyone may open a connection to.
    policies = of_kind(objs, "NetworkPolicy")
    for name, labels in pods_of(objs).items():
        open_rules = [rule for p in policies.values() if selects(p["spec"]["podSelector"], labels)
                      for rule in p["spec"].get("ingress", []) if "from" not in rule]
        assert bool(open_rules) == (name == "gateway"), f"{path}: {name} ingress open to all: {open_rules}"


def _admitted(objs: list[dict[str, Any]], target: dict[str, str], port: int) -> list[dict[str, Any]]:
    """The ``from`` peers that the NetworkPolicies selecting ``target`` pods admit on ``port``; a rule
    without ``from`` admits everyone ({"everyone": True}); a pod no policy isolates admits everyone."""
    policies = [p for p in of_kind(objs, "NetworkPolicy").values()
                if selects(p["spec"]["podSelector"], target) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return [{"everyone": True}]
    peers = []
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and not any(p.get("port") == port for p in rule["ports"]):
                continue
            peers.extend(rule.get("from", [{"everyone": True}]))
    return peers


@pytest.mark.parametrize("path", OVERLAYS)
def test_network_policies_admit_only_the_gateway_to_the_stages(path: str) -> None:
    objs = objects(path)
    pods = pods_of(objs)
    default_deny = [p for p in of_kind(objs, "NetworkPolicy").values()
                    if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
                    and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert default_deny, "a default-deny policy isolates every pod of the namespace"
    for stage, port in STAGES.items():
        peers = _admitted(objs, pods[stage], port)
        assert peers, f"{path}: nothing reaches {stage}:{port}, not even the gateway"
        for peer in peers:
            assert set(peer) == {"podSelector"}, f"{path}: {stage}:{port} admits {peer} (not a pod of this namespace)"
            admitted = {name for name, labels in pods.items() if selects(peer["podSelector"], labels)}
            assert admitted == {"gateway"}, f"{path}: {stage}:{port} admits {admitted}"
        # the metrics port: only from the monitoring namespace
        for peer in _admitted(objs, pods[stage], 9464):
            assert set(peer) == {"namespaceSelector"}
        # and the stages reach nothing at all
        isolating = [p for p in of_kind(objs, "NetworkPolicy").values()
                     if selects(p["spec"]["podSelector"], pods[stage]) and "Egress" in p["spec"]["policyTypes"]]
        assert isolating and not any(p["spec"].get("egress") for p in isolating)
    gateway_egress = [rule for p in of_kind(objs, "NetworkPolicy").values()
                      if selects(p["spec"]["podSelector"], pods["gateway"]) for rule in p["spec"].get("egress", [])]
    for stage, port in STAGES.items():
        assert any(any(selects(peer.get("podSelector", {"matchLabels": {"x": "no"}}), pods[stage])
                       for peer in rule.get("to", [])) and any(p["port"] == port for p in rule["ports"])
                   for rule in gateway_egress), f"{path}: the gateway may not reach {stage}:{port}"


@pytest.mark.parametrize("path", OVERLAYS + ("model-loader",))
def test_no_image_floats(path: str) -> None:
    for name, _, spec in pod_specs(objects(path)):
        for container in containers(spec):
            image = container["image"]
            if "@sha256:" in image:
                continue
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest", f"{path}: {name} uses {image!r}: pin a tag or digest"


@pytest.mark.parametrize("path", GPU_OVERLAYS)
def test_the_model_comes_from_a_read_only_volume(path: str) -> None:
    objs = objects(path)
    claims = of_kind(objs, "PersistentVolumeClaim")
    assert "t2v-models" in claims
    for name, deployment in of_kind(objs, "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == "models")
        assert volume["persistentVolumeClaim"] == {"claimName": "t2v-models", "readOnly": True}
        mounts = [m for c in containers(spec) for m in c.get("volumeMounts", []) if m["name"] == "models"]
        assert mounts and all(m.get("readOnly") is True and m["mountPath"] == MODEL_MOUNT for m in mounts)
        assert env_of(objs, deployment)["T2V_MODEL"].startswith(MODEL_MOUNT + "/")
    assert "HF_HUB_OFFLINE" in env_of(objs, of_kind(objs, "Deployment")["denoiser"])


def test_the_cpu_dev_model_is_the_one_in_the_image() -> None:
    objs = objects("overlays/cpu-dev")
    for deployment in of_kind(objs, "Deployment").values():
        model = env_of(objs, deployment)["T2V_MODEL"]
        assert model == "/app/models/t2v-world" and (REPO / "models" / "t2v-world" / "model_index.json").is_file()
        # read-only: it lies on the image's root filesystem, mounted read-only (checked above)


def test_only_the_model_loader_writes_the_model_volume() -> None:
    loader = of_kind(objects("model-loader"), "Pod")["t2v-model-loader"]
    mount = next(m for m in loader["spec"]["containers"][0]["volumeMounts"] if m["name"] == "models")
    assert not mount.get("readOnly")
    # one definition of the claim, shared by the loader and the gpu overlays
    assert of_kind(objects("model-loader"), "PersistentVolumeClaim")["t2v-models"]["spec"] == \
        of_kind(objects("overlays/gpu"), "PersistentVolumeClaim")["t2v-models"]["spec"]


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_gateway_reaches_every_pod_of_each_stage_through_dns(path: str) -> None:
    objs = objects(path)
    gateway = of_kind(objs, "Deployment")["gateway"]
    env = env_of(objs, gateway)
    services = of_kind(objs, "Service")
    assert json.loads(env["POD_NAMESPACE"].removeprefix("<from ").removesuffix(">")) == \
        {"fieldRef": {"fieldPath": "metadata.namespace"}}
    for stage, port in STAGES.items():
        variable = "T2V_" + stage.replace("-", "_").upper()
        assert env[variable] == f"dns:///{stage}.$(POD_NAMESPACE).svc.cluster.local:{port}"
        assert services[stage]["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("path", OVERLAYS)
def test_settings_come_from_config_maps_and_the_api_keys_from_a_secret(path: str) -> None:
    objs = objects(path)
    config_maps = of_kind(objs, "ConfigMap")
    for name, deployment in of_kind(objs, "Deployment").items():
        for source in deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]:
            assert source["configMapRef"]["name"] in config_maps, f"{name}: missing {source}"
        env = env_of(objs, deployment)
        assert env["T2V_HOST"] == "0.0.0.0" and env["T2V_METRICS_PORT"] == "9464"
        grace = float(env["T2V_GRACE_SECONDS"])
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace + 20, \
            f"{name}: the kubelet must not kill the pod while it drains"
    gateway = of_kind(objs, "Deployment")["gateway"]
    spec = gateway["spec"]["template"]["spec"]
    keys_file = Path(env_of(objs, gateway)["T2V_API_KEYS_FILE"])
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if keys_file.is_relative_to(m["mountPath"]))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "t2v-api-keys" and not volume["secret"].get("optional")
    assert str(keys_file.relative_to(mount["mountPath"])) in {i["path"] for i in volume["secret"]["items"]}
    # The API keys are the operator's, never in the repository; the one Secret-bearing thing here is
    # the dev database's throwaway password and URL, in the dev overlay only.
    secrets = set(of_kind(objs, "Secret"))
    assert "t2v-api-keys" not in secrets
    assert secrets == (DEV_DATABASE_SECRETS if path in DEV_OVERLAYS else set()), f"{path}: Secrets {secrets}"


# --- the gateway: stateless replicas on a shared PostgreSQL ----------------------------------------

@pytest.mark.parametrize("path", OVERLAYS)
def test_the_gateway_is_three_replicas_rolled_one_at_a_time(path: str) -> None:
    gateway = of_kind(objects(path), "Deployment")["gateway"]
    assert gateway["spec"]["replicas"] == GATEWAY_REPLICAS
    assert gateway["spec"]["strategy"] == {"type": "RollingUpdate",
                                           "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}, \
        "a rollout starts a new replica before it stops an old one: the API never loses a replica"


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_gateway_keeps_no_state_on_its_pods(path: str) -> None:
    objs = objects(path)
    gateway = of_kind(objs, "Deployment")["gateway"]
    spec = gateway["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for name, volume in volumes.items():
        claim = volume.get("persistentVolumeClaim")
        if claim is not None:      # the gpu overlays' model volume, read-only; never a state volume
            assert claim == {"claimName": "t2v-models", "readOnly": True}, f"{path}: gateway volume {name}: {claim}"
        else:
            assert set(volume) - {"name"} <= {"emptyDir", "secret"}, f"{path}: gateway volume {name}: {volume}"
    writable = [m for c in containers(spec) for m in c.get("volumeMounts", []) if not m.get("readOnly")]
    assert all("emptyDir" in volumes[m["name"]] for m in writable), f"{path}: {writable}"
    claims = of_kind(objs, "PersistentVolumeClaim")
    assert not [n for n, c in claims.items() if c["metadata"]["labels"].get(COMPONENT) == "gateway"]
    assert "t2v-gateway-state" not in claims
    assert "T2V_STATE_DIR" not in env_of(objs, gateway), "a state folder on a pod would be lost with the pod"


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_gateway_reads_its_job_store_url_from_a_required_secret(path: str) -> None:
    objs = objects(path)
    gateway = of_kind(objs, "Deployment")["gateway"]
    (variable,) = [v for v in gateway["spec"]["template"]["spec"]["containers"][0]["env"]
                   if v["name"] == "T2V_JOB_STORE"]
    assert variable == {"name": "T2V_JOB_STORE",
                        "valueFrom": {"secretKeyRef": {"name": JOB_STORE_SECRET, "key": "url"}}}, \
        "not optional: a missing Secret must stop the pod, never leave each replica with its own SQLite"
    for config_map in of_kind(objs, "ConfigMap").values():
        assert not {"T2V_JOB_STORE", "T2V_STATE_DIR"} & set(config_map["data"]), config_map["metadata"]["name"]


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_gateway_replicas_spread_over_nodes_without_requiring_it(path: str) -> None:
    objs = objects(path)
    gateway = of_kind(objs, "Deployment")["gateway"]
    spec = gateway["spec"]["template"]["spec"]
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    spread = {c["topologyKey"]: c for c in spec.get("topologySpreadConstraints", [])}
    by_node = spread["kubernetes.io/hostname"]
    assert by_node["maxSkew"] == 1 and selects(by_node["labelSelector"], labels)
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in spread.values()), \
        "preferred, not required: a one-node dev cluster must still run every replica"
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in spec.get("affinity", {}).get("podAntiAffinity", {})


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_gateway_budget_keeps_two_replicas_serving(path: str) -> None:
    objs = objects(path)
    gateway = of_kind(objs, "Deployment")["gateway"]
    (budget,) = [b for b in of_kind(objs, "PodDisruptionBudget").values()
                 if selects(b["spec"]["selector"], gateway["spec"]["template"]["metadata"]["labels"])]
    replicas = gateway["spec"]["replicas"]
    serving = budget["spec"]["minAvailable"] if "minAvailable" in budget["spec"] \
        else replicas - budget["spec"]["maxUnavailable"]
    assert serving >= 2, f"{path}: a drain may leave {serving} gateway replica(s)"
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_gateway_may_reach_its_database(path: str) -> None:
    objs = objects(path)
    gateway = pods_of(objs)["gateway"]
    egress = [rule for p in of_kind(objs, "NetworkPolicy").values()
              if selects(p["spec"]["podSelector"], gateway) for rule in p["spec"].get("egress", [])]
    assert any(any(p["port"] == POSTGRES_PORT and p.get("protocol", "TCP") == "TCP" for p in rule.get("ports", []))
               for rule in egress), f"{path}: the gateway may not open a connection to port {POSTGRES_PORT}"


# --- the dev database (components/postgres-dev, in overlays/cpu-dev only) --------------------------

def test_the_dev_database_is_one_pinned_postgres_on_its_own_volume() -> None:
    objs = objects("overlays/cpu-dev")
    (database,) = of_kind(objs, "StatefulSet").values()
    spec = database["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert re.fullmatch(r"postgres:1[3-9]\.[0-9]+(-[a-z0-9]+)?", container["image"]), \
        f"the official image, pinned to a minor version: {container['image']}"
    assert pod["securityContext"]["runAsUser"] == 999 and pod["securityContext"]["runAsGroup"] == 999
    assert pod["securityContext"]["fsGroup"] == 999, "the volume must be writable by the postgres user"
    (template,) = spec["volumeClaimTemplates"]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"] and quantity(
        template["spec"]["resources"]["requests"]["storage"]) >= 2**30
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {v["name"]: v for v in container["env"]}
    data_mount = next(path for path, name in mounts.items() if name == template["metadata"]["name"])
    assert Path(env["PGDATA"]["value"]).parent == Path(data_mount), "PGDATA a folder inside the volume"
    for writable in ("/var/run/postgresql", "/tmp"):     # the root filesystem is read-only
        assert "emptyDir" in volumes[mounts[writable]], f"{writable} needs an emptyDir"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[0] == "pg_isready" and "--host=127.0.0.1" in command, f"{probe}: {command}"
    password = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password["name"] in of_kind(objs, "Secret")
    # its Service, which is also the StatefulSet's serviceName
    service = of_kind(objs, "Service")[spec["serviceName"]]
    assert selects({"matchLabels": service["spec"]["selector"]}, spec["template"]["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert port["port"] == POSTGRES_PORT and port["targetPort"] == "postgres"
    assert {"name": "postgres", "containerPort": POSTGRES_PORT, "protocol": "TCP"} in container["ports"]


def test_the_dev_job_store_secret_points_at_the_dev_database() -> None:
    objs = objects("overlays/cpu-dev")
    (database,) = of_kind(objs, "StatefulSet").values()
    env = {v["name"]: v for v in database["spec"]["template"]["spec"]["containers"][0]["env"]}
    secrets = of_kind(objs, "Secret")
    url = urlsplit(secrets[JOB_STORE_SECRET]["stringData"]["url"])
    password_ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert url.scheme == "postgresql"
    assert (url.hostname, url.port) == (database["spec"]["serviceName"], POSTGRES_PORT)
    assert url.username == env["POSTGRES_USER"]["value"] and url.path == "/" + env["POSTGRES_DB"]["value"]
    assert url.password == secrets[password_ref["name"]]["stringData"][password_ref["key"]]


def test_only_the_gateway_reaches_the_dev_database() -> None:
    objs = objects("overlays/cpu-dev")
    pods = pods_of(objs)
    database = pods["job-store"]
    peers = _admitted(objs, database, POSTGRES_PORT)
    assert peers, "nothing reaches PostgreSQL, not even the gateway"
    for peer in peers:
        assert set(peer) == {"podSelector"}, f"PostgreSQL admits {peer} (not a pod of this namespace)"
        assert {name for name, labels in pods.items() if selects(peer["podSelector"], labels)} == {"gateway"}
    for port in (9464, 8080, 50050, 5433):
        assert _admitted(objs, database, port) == [], f"PostgreSQL's pod admits connections to port {port}"
    isolating = [p for p in of_kind(objs, "NetworkPolicy").values()
                 if selects(p["spec"]["podSelector"], database) and "Egress" in p["spec"]["policyTypes"]]
    assert isolating and not any(p["spec"].get("egress") for p in isolating), "PostgreSQL connects nowhere"


@pytest.mark.parametrize("path", GPU_OVERLAYS)
def test_the_production_overlays_run_no_dev_database(path: str) -> None:
    included = yaml.safe_load((K8S / path / "kustomization.yaml").read_text())
    assert not any(Path(entry).name == Path(DEV_DATABASE).name
                   for entry in included.get("components", []) + included.get("resources", []))
    objs = objects(path)
    assert not of_kind(objs, "StatefulSet") and not of_kind(objs, "Secret")
    assert not [o for o in objs if o["metadata"].get("labels", {}).get(COMPONENT) == "job-store"]
    # the operator's Secret is still what the gateway reads
    gateway = of_kind(objs, "Deployment")["gateway"]
    source = env_of(objs, gateway)["T2V_JOB_STORE"].removeprefix("<from ").removesuffix(">")
    assert json.loads(source) == {"secretKeyRef": {"name": JOB_STORE_SECRET, "key": "url"}}


def test_the_dev_database_is_a_component() -> None:
    component = yaml.safe_load((K8S / DEV_DATABASE / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    for overlay in DEV_OVERLAYS:
        included = yaml.safe_load((K8S / overlay / "kustomization.yaml").read_text())
        assert "../../" + DEV_DATABASE in included["components"]


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_service_is_scraped(path: str) -> None:
    objs = objects(path)
    for name, deployment in of_kind(objs, "Deployment").items():
        template = deployment["spec"]["template"]
        assert template["metadata"]["annotations"]["prometheus.io/port"] == env_of(objs, deployment)["T2V_METRICS_PORT"]
        assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in template["spec"]["containers"][0]["ports"]
        service = of_kind(objs, "Service")[name]
        assert any(p["name"] == "metrics" for p in service["spec"]["ports"])
    if path in GPU_OVERLAYS:
        (monitor,) = of_kind(objs, "ServiceMonitor").values()
        for service in of_kind(objs, "Service").values():
            assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


@pytest.mark.parametrize("path", GPU_OVERLAYS)
def test_the_alerts_and_the_dashboard_ship_with_the_scrape(path: str) -> None:
    """The monitoring component brings the rules (the same as the plain rules file) and the dashboard as a
    ConfigMap Grafana's sidecar loads: labelled for it, unhashed (a new copy per change would stay loaded
    beside the old), the JSON byte for byte, and small enough for `kubectl apply`'s last-applied annotation
    (256 KiB)."""
    objs = objects(path)
    (rule,) = of_kind(objs, "PrometheusRule").values()
    assert rule["spec"] == yaml.safe_load((MONITORING / "t2v-mesh.rules.yaml").read_text())
    dashboards = [c for c in of_kind(objs, "ConfigMap").values()
                  if DASHBOARD_LABEL.items() <= c["metadata"].get("labels", {}).items()]
    assert [c["metadata"]["name"] for c in dashboards] == ["t2v-mesh-dashboard"]
    (data,) = dashboards[0]["data"].items()
    assert data == ("t2v-mesh.json", (MONITORING / "dashboards" / "t2v-mesh.json").read_text())
    assert json.loads(data[1])["uid"] == "t2v-mesh"
    assert len(json.dumps(dashboards[0])) < 128 * 1024
    assert rule["metadata"]["namespace"] == dashboards[0]["metadata"]["namespace"] == "t2v"


def test_the_cpu_dev_overlay_ships_no_monitoring() -> None:
    kinds = {o["kind"] for o in objects("overlays/cpu-dev")}
    assert not {"ServiceMonitor", "PrometheusRule"} & kinds, "cpu-dev needs no Prometheus Operator"


def _demand_thresholds(objs: list[dict[str, Any]]) -> dict[str, tuple[float, int, int, dict[str, Any]]]:
    """stage -> (demand per replica, min, max, HPA behaviour) from the ScaledObjects or the HPAs."""
    found = {}
    for o in objs:
        if o["kind"] == "ScaledObject":
            (trigger,) = o["spec"]["triggers"]
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            query = trigger["metadata"]["query"]
            assert set(re.findall(r'namespace="([^"]+)"', query)) == {o["metadata"]["namespace"]}, \
                "the query must read this namespace's gateway"
            assert "t2v_gateway_queue_depth" in query and "t2v_gateway_jobs_in_flight" in query
            # every gateway replica reports the whole shared queue: max over replicas, never sum
            assert "max by (priority) (t2v_gateway_queue_depth" in query and "sum(t2v_gateway_jobs_in_flight" in query
            found[o["spec"]["scaleTargetRef"]["name"]] = (
                float(trigger["metadata"]["threshold"]), o["spec"]["minReplicaCount"], o["spec"]["maxReplicaCount"],
                o["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
        elif o["kind"] == "HorizontalPodAutoscaler":
            (metric,) = o["spec"]["metrics"]
            assert metric["external"]["metric"]["name"] == "t2v_gateway_demand"
            found[o["spec"]["scaleTargetRef"]["name"]] = (
                quantity(metric["external"]["target"]["averageValue"]), o["spec"]["minReplicas"],
                o["spec"]["maxReplicas"], o["spec"]["behavior"])
    return found


@pytest.mark.parametrize("path", GPU_OVERLAYS)
def test_each_stage_scales_on_the_gateways_queue_with_slow_gpu_behaviour(path: str) -> None:
    objs = objects(path)
    deployments = of_kind(objs, "Deployment")
    scaling = _demand_thresholds(objs)
    assert set(scaling) == set(STAGES), "every stage scales, the gateway does not (a fixed 3 replicas)"
    for stage, (per_replica, low, high, behavior) in scaling.items():
        assert 1 <= low <= high and deployments[stage]["spec"]["replicas"] >= low
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 600
        assert all(p["type"] == "Pods" and p["value"] == 1 and p["periodSeconds"] >= 120
                   for p in behavior["scaleDown"]["policies"])
    # The gateway must hand the whole denoiser pool enough jobs: slots >= batch x max replicas,
    # and a denoiser replica is asked for per batch of demand.
    gateway_env = env_of(objs, deployments["gateway"])
    denoiser_env = env_of(objs, deployments["denoiser"])
    batch = int(denoiser_env["T2V_MAX_BATCH"])
    assert int(gateway_env["T2V_SLOTS"]) >= batch * scaling["denoiser"][2]
    assert scaling["denoiser"][0] == batch
    # ... and with a single denoiser up, all those jobs land on it: it must admit them.
    assert int(denoiser_env["T2V_MAX_JOBS"]) >= int(gateway_env["T2V_SLOTS"])
    # One decoder / text encoder serves many denoisers (docs/deploy.md has the arithmetic).
    assert scaling["decoder"][0] >= 10 * batch and scaling["text-encoder"][0] >= scaling["decoder"][0]


def test_keda_and_hpa_alternatives_agree() -> None:
    keda, hpa = _demand_thresholds(objects("overlays/gpu")), _demand_thresholds(objects("overlays/gpu-hpa"))
    assert keda == hpa
    values = yaml.safe_load((K8S / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["external"]
    assert rule["name"]["as"] == "t2v_gateway_demand"
    assert "t2v_gateway_queue_depth" in rule["metricsQuery"] and "t2v_gateway_jobs_in_flight" in rule["metricsQuery"]
    assert "max by (namespace, priority) (t2v_gateway_queue_depth" in rule["metricsQuery"], \
        "the replicas share one queue and each reports all of it: max over replicas"


def test_the_metrics_the_autoscalers_read_are_the_gateways() -> None:
    """The names in the queries are the ones services/gateway/metrics.py exports."""
    source = (REPO / "services" / "gateway" / "metrics.py").read_text()
    assert '"t2v_gateway_queue_depth"' in source and '"t2v_gateway_jobs_in_flight"' in source


def test_the_image_recipe_matches_the_manifests() -> None:
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    torch = re.search(r"^TORCH_SPEC \?= (\S+)", makefile, re.M).group(1)  # type: ignore[union-attr]
    assert f"ARG TORCH_SPEC={torch}" in dockerfile, "the image installs the torch the Makefile does"
    assert "pip install -e ." in dockerfile and 'ENTRYPOINT ["t2v"]' in dockerfile
    assert "USER 10001:10001" in dockerfile
    for _, _, spec in pod_specs(objects("overlays/gpu")):
        assert spec["securityContext"]["runAsUser"] == 10001
    assert not re.search(r"^FROM \S+:latest", dockerfile, re.M)
