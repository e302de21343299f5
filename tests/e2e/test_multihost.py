"""A run across hosts joined by a real network: Linux network namespaces and veth pairs on a bridge
(tests/e2e/netns.py), one service process per role on its own host, the orchestrator (`quartet train`)
on another, TLS and bearer tokens on every connection. A GRPO run of a few steps completes; a host
whose cable is pulled mid-run is waited for (calls past their deadline are retried) and the run goes on
when it comes back; a generator replica whose cable is pulled for good is taken out of the replica set
and the run finishes on the other.

Needs root and iproute2 (CI runs as root); skipped elsewhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.e2e.netns import Hosts, skip_reason
from tests.e2e.test_run import task  # noqa: F401 (a fixture used by name)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TOKEN, ADMIN = "multihost-call-token", "multihost-admin-token"
PORT = 50051


@pytest.fixture(scope="module")
def hosts():
    if (why := skip_reason()) is not None:
        pytest.skip(why)
    with Hosts(["orch", "gen1", "gen2", "svc"]) as made:
        yield made


def _pki(tmp: Path, ips: list[str]) -> dict[str, Path]:
    """A CA and one server certificate naming every host's address."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def make(cn, key, issuer_cn, issuer_key, *, ca, sans=()):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)])).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = make("quartet-test-ca", ca_key, "quartet-test-ca", ca_key, ca=True)
    server = make("quartet-hosts", server_key, "quartet-test-ca", ca_key, ca=False,
                  sans=[x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips])
    files = {"ca": tmp / "ca.pem", "cert": tmp / "server.pem", "key": tmp / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return files


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos"),
                                                         os.environ.get("PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}


def _serve(hosts: Hosts, host: str, name: str, role: str, port: int, pki, tmp: Path, *, model: Path | None = None,
           options: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """One role as its own process on `host`, serving TLS on the host's address; returns it and its ready file."""
    ready = tmp / f"{name}.ready.json"
    cfg = {"role": role, "server": {"host": hosts.address(host), "port": port, "metrics_port": None, "token": TOKEN,
                                    "admin_token": ADMIN, "tls_cert": str(pki["cert"]), "tls_key": str(pki["key"]),
                                    "grace_seconds": 2},
           "ready_file": str(ready), "options": options or {}}
    if model is not None:
        cfg["model"] = {"path": str(model)}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = (tmp / f"{name}.log").open("w")
    proc = hosts.popen(host, [sys.executable, "-m", "services", "serve", "--config", str(path)],
                       stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    return proc, ready


def _serve_all(hosts: Hosts, pki, tmp: Path, model: Path, files: dict[str, Path],
               layout: dict[str, tuple[str, str, int]]) -> dict[str, tuple[subprocess.Popen, Path]]:
    """Each service of `layout` (name: (host, role, port)) as its own process (`_serve`): the reward
    with the digits plugin of `files`, every other role serving `model`."""
    return {name: _serve(hosts, host, name, role, port, pki, tmp,
                         **({"options": _digits_reward(files)} if role == "reward" else {"model": model}))
            for name, (host, role, port) in layout.items()}


def _wait_ready(started: dict[str, tuple[subprocess.Popen, Path]], tmp: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    for name, (proc, ready) in started.items():
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not start:\n{(tmp / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.2)


def _digits_reward(files: dict[str, Path]) -> dict:
    """The reward options of tests/e2e/test_run.py's plugin: varied rewards from a random tiny model."""
    return {"kind": "plugin", "plugin": "digits_reward:score", "plugin_path": str(files["root"]), "workers": 1}


def _endpoint(hosts: Hosts, host: str, port: int, pki) -> dict:
    return {"address": f"{hosts.address(host)}:{port}", "token": TOKEN, "admin_token": ADMIN, "tls_ca": str(pki["ca"])}


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _train(hosts: Hosts, tmp: Path, model: Path, files: dict[str, Path], services: dict, steps: int,
           during: Callable[[Callable[[], int]], None], **algorithm: object) -> tuple[int, str, list[dict]]:
    """`quartet train` on the orch host against `services`; `during(done_steps)` runs while it trains."""
    run_dir = tmp / "run"
    cfg = {
        "models": {"policy": str(model)},
        "services": services,
        "algorithm": {"name": "grpo", "lr": 1e-3, **algorithm},
        "sampling": {"max_new_tokens": 4},
        "dataset": {"path": str(files["train"])},
        "prompts_per_step": 4, "samples_per_prompt": 4, "steps": steps, "seed": 0, "metrics_port": None,
        "run_dir": str(run_dir), "progress": {"mode": "lines", "every_steps": 1},
    }
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = (tmp / "orchestrator.log").open("w")
    # PYTHONFAULTHANDLER: a run that hangs is sent SIGABRT below, and its log then shows every thread's stack.
    orch = hosts.popen("orch", [sys.executable, "-m", "cli.main", "train", str(tmp / "run.yaml")], stdout=out,
                       stderr=subprocess.STDOUT, env={**_env(), "PYTHONFAULTHANDLER": "1"}, cwd=REPO)
    log_path = run_dir / "steps.jsonl"

    def done_steps() -> int:
        assert orch.poll() in (None, 0), (tmp / "orchestrator.log").read_text()[-3000:]
        return len(log_path.read_text().splitlines()) if log_path.exists() else 0

    try:
        during(done_steps)
        try:
            code = orch.wait(timeout=240)
        except subprocess.TimeoutExpired:
            orch.send_signal(signal.SIGABRT)  # `ip netns exec` execs python: this is the orchestrator itself
            orch.wait(timeout=30)
            pytest.fail("the run hung; its threads when stopped:\n" + (tmp / "orchestrator.log").read_text()[-12000:])
    finally:
        _stop([orch])
    lines = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    return code, (tmp / "orchestrator.log").read_text(), lines


def _wait_steps(done_steps: Callable[[], int], n: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while (done := done_steps()) < n:
        assert time.monotonic() < deadline, f"only {done} steps after {timeout} s"
        time.sleep(0.1)
    return done


def test_grpo_across_hosts_with_tls_rides_through_a_pulled_cable(hosts: Hosts, tiny_checkpoint: Path,
                                                                  task: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    pki = _pki(tmp_path, [hosts.address(h) for h in hosts.names])
    started = _serve_all(hosts, pki, tmp_path, tiny_checkpoint, task, {
        "generator": ("gen1", "generator", PORT), "reward": ("svc", "reward", PORT),
        "reference": ("svc", "reference", PORT + 1)})
    services = {
        "generator": {**_endpoint(hosts, "gen1", PORT, pki), "weights_transport": "grpc"},
        "rewards": [_endpoint(hosts, "svc", PORT, pki)],
        "reference": _endpoint(hosts, "svc", PORT + 1, pki),
        # A call into a cut link hangs until its deadline, then is retried within the budget.
        "deadlines": {"generate_s": 8, "score_s": 4, "logprobs_s": 4, "info_s": 3},
        "retry": {"max_attempts": 30, "initial_backoff_s": 0.2, "max_backoff_s": 1.0, "budget_s": 90},
    }
    seen: dict[str, int] = {}

    def pull_the_cable(done_steps: Callable[[], int]) -> None:
        seen["cut_at"] = _wait_steps(done_steps, 3)
        hosts.cut("svc")  # reward and reference unreachable: packets dropped, connections hang
        time.sleep(6)
        seen["stalled_at"] = done_steps()
        hosts.mend("svc")

    try:
        _wait_ready(started, tmp_path)
        code, text, lines = _train(hosts, tmp_path, tiny_checkpoint, task, services, 12, pull_the_cable)
    finally:
        _stop([p for p, _ in started.values()])
    assert code == 0, text[-4000:]
    assert [row["step"] for row in lines] == list(range(1, 13)), "every step logged once, in order"
    assert seen["stalled_at"] <= seen["cut_at"] + 1, "no step can complete without its reward and reference"
    assert "retrying" in text, "the calls into the cut link were retried"
    for name in started:  # every service served TLS on its namespace address
        assert "tls=on" in (tmp_path / f"{name}.log").read_text()


def test_a_generator_replica_cut_off_mid_run_leaves_the_run_to_the_other(hosts: Hosts, tiny_checkpoint: Path,
                                                                         task: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    pki = _pki(tmp_path, [hosts.address(h) for h in hosts.names])
    started = _serve_all(hosts, pki, tmp_path, tiny_checkpoint, task, {
        "gen1": ("gen1", "generator", PORT), "gen2": ("gen2", "generator", PORT), "reward": ("svc", "reward", PORT)})
    generator = _endpoint(hosts, "gen1", PORT, pki)
    generator["address"] = [f"{hosts.address(h)}:{PORT}" for h in ("gen1", "gen2")]
    services = {
        "generator": {**generator, "weights_transport": "grpc"},
        "rewards": [_endpoint(hosts, "svc", PORT, pki)],
        # Short deadlines and budget: a replica behind a cut cable is given up on within seconds.
        "deadlines": {"generate_s": 4, "weights_s": 6, "info_s": 2},
        "retry": {"max_attempts": 2, "initial_backoff_s": 0.1, "max_backoff_s": 0.2, "budget_s": 5},
    }
    seen: dict[str, int] = {}

    def cut_gen2(done_steps: Callable[[], int]) -> None:
        seen["cut_at"] = _wait_steps(done_steps, 3)
        hosts.cut("gen2")  # for good: the run must finish on gen1

    try:
        _wait_ready(started, tmp_path)
        code, text, lines = _train(hosts, tmp_path, tiny_checkpoint, task, services, 12, cut_gen2, kl_coef=0.0)
    finally:
        hosts.mend("gen2")
        _stop([p for p, _ in started.values()])
    assert code == 0, text[-4000:]
    assert [row["step"] for row in lines] == list(range(1, 13))
    # gen2 was given up on once (its calls ran past their deadline), gen1 served every step and version after it.
    assert f"generator at {hosts.address('gen2')}:{PORT} taken out of the replica set" in text, text[-3000:]
    assert f"generator at {hosts.address('gen1')}:{PORT} taken out" not in text
    assert lines[-1]["weight_version"] == 12
    assert all("tls=on" in (tmp_path / f"{name}.log").read_text() for name in ("gen1", "gen2"))
