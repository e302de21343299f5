"""The `quartet` CLI: help texts, version, status/health against real servers, serve's config layering."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import cli.serve
import services.common.command
from cli.main import app
from services.common.command import field_at
from services.common.config import EXPOSED, ConfigError, ServerConfig, load_service_config, parse_set
from services.common.role import ModelConfig
from services.common.server import RunningServer, start_server
from tests.integration.echo_role import ROLE

runner = CliRunner()
WIDE = {"COLUMNS": "250", "QUARTET_TOKEN": ""}


@pytest.fixture
def echo(tokens: dict[str, str]) -> Iterator[RunningServer]:
    srv = start_server(ROLE, model=None, server=ServerConfig(token=tokens["token"], metrics_port=None))
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def loading() -> Iterator[RunningServer]:
    srv = start_server(ROLE, options={"block_load": True}, server=ServerConfig(metrics_port=None), wait_ready=False)
    yield srv
    srv.role.release.set()
    srv.stop(grace=0)


@pytest.fixture
def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_top_level_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"], env=WIDE)
    assert result.exit_code == 0
    for command in ("serve", "status", "health", "version"):
        assert command in result.output
    assert "reinforcement-learning" in result.output
    assert "Usage" in runner.invoke(app, [], env=WIDE).output  # no arguments -> help


def test_serve_help_explains_roles_and_precedence() -> None:
    out = runner.invoke(app, ["serve", "--help"], env=WIDE).output
    for text in ("generator, reward, reference, value", "dotted module path", "--config", "--set",
                 "flags < --set", "QUARTET_TOKEN", "--ready-file", "--grace", "SIGTERM"):
        assert text in out, text


def _plain(help_text: str) -> str:
    """Help output without the panel borders and line wrapping."""
    return " ".join(help_text.replace("│", " ").split())


def test_serve_help_lists_every_config_field_with_its_description() -> None:
    out = _plain(runner.invoke(app, ["serve", "--help"], env=WIDE).output)
    model_fields = {f"model.{name}" for name in ModelConfig.model_fields}
    server_fields = {f"server.{name}" for name in ServerConfig.model_fields}
    assert model_fields | server_fields | {"checkpoint_dir", "ready_file"} == {e.path for e in EXPOSED}
    for e in EXPOSED:
        help_text = _plain(field_at(e.path).description or "")
        assert help_text and f"{e.flag} " in out and f"{help_text} ({e.path}, ${e.env}" in out, e.path
    for panel in ("Model", "Network", "Auth and TLS", "Runtime"):
        assert f"╭─ {panel} ─" in runner.invoke(app, ["serve", "--help"], env=WIDE).output


def test_serve_help_texts_are_written_once() -> None:
    """The flags' help comes from the config models' descriptions, not from a second copy in the CLI."""
    sources = [Path(cli.serve.__file__).read_text(), Path(services.common.command.__file__).read_text()]
    assert "help=" not in sources[0]
    for e in EXPOSED:
        description = field_at(e.path).description or ""
        assert all(description[:40] not in source for source in sources), e.path


def test_python_m_services_serves_a_config_file_without_the_cli(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    config = tmp_path / "svc.yaml"
    config.write_text(f"role: tests.integration.echo_role\nready_file: {ready}\n"
                      "server: {metrics_port: null, grace_seconds: 1}\n")
    probe = ("import sys, services.__main__; "
             "assert not [m for m in sys.modules if m.split('.')[0] in ('cli', 'orchestrator')], 'imports the CLI'")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUARTET_")}
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, check=True, timeout=120)
    proc = subprocess.Popen([sys.executable, "-m", "services", "serve", "--config", str(config)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.communicate(timeout=10)[0].decode()
        address = json.loads(ready.read_text())["address"]
        assert runner.invoke(app, ["health", address]).exit_code == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, output


def test_version_prints_package_versions() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names[:4] == ["quartet-rl", "grpcio", "protobuf", "torch"]


def test_status_table_and_json(echo: RunningServer, tokens: dict[str, str]) -> None:
    result = runner.invoke(app, ["status", echo.address, "--token", tokens["token"]], env=WIDE)
    assert result.exit_code == 0, result.output
    assert echo.address in result.output and "SERVING" in result.output and "ffffffffffff" in result.output
    result = runner.invoke(app, ["status", echo.address, "--json", "--token", tokens["token"]], env=WIDE)
    [row] = json.loads(result.output)
    assert row["role"] == "generator" and row["health"] == "SERVING" and row["backend"] == "echo"
    assert row["up"] and row["identity"] == "echo@test" and not row["error"]


def test_status_without_token_reports_the_getinfo_error(echo: RunningServer) -> None:
    result = runner.invoke(app, ["status", echo.address, "--json"], env=WIDE)
    [row] = json.loads(result.output)
    assert row["health"] == "SERVING" and row["error"].startswith("GetInfo: UNAUTHENTICATED")


def test_status_exits_1_if_any_endpoint_is_down(echo: RunningServer, loading: RunningServer,
                                               dead_address: str, tokens: dict[str, str]) -> None:
    args = ["status", echo.address, loading.address, dead_address, "--json", "--timeout", "1"]
    result = runner.invoke(app, [*args, "--token", tokens["token"]], env=WIDE)
    assert result.exit_code == 1
    rows = {r["address"]: r for r in json.loads(result.output)}
    assert rows[echo.address]["up"]
    assert rows[loading.address]["health"] == "NOT_SERVING" and rows[loading.address]["role"] == "generator"
    assert rows[dead_address]["health"] == "UNREACHABLE: UNAVAILABLE"


def test_health_exit_code(echo: RunningServer, loading: RunningServer, dead_address: str) -> None:
    ok = runner.invoke(app, ["health", echo.address])
    assert ok.exit_code == 0 and ok.output == ""
    assert runner.invoke(app, ["health", echo.address, "--service", "quartet.v1.Generator"]).exit_code == 0
    assert runner.invoke(app, ["health", loading.address]).exit_code == 1
    assert runner.invoke(app, ["health", dead_address, "--timeout", "1"]).exit_code == 1
    assert runner.invoke(app, ["health", echo.address, "-v"]).output.strip() == "SERVING"


# ---- serve: configuration layering (defaults < file < env < flags < --set), errors naming fields ----

@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run `quartet serve` up to the point where it would serve, and capture what it would serve."""
    seen: dict[str, Any] = {}

    def fake_serve_role(role: str, **kwargs: Any) -> int:
        seen.update(kwargs, role=role)
        return 0

    def no_exit(code: int) -> None:
        raise typer.Exit(code)

    monkeypatch.setattr("services.common.server.serve_role", fake_serve_role)
    monkeypatch.setattr(cli.serve, "_exit_process", no_exit)
    for key in ("QUARTET_PORT", "QUARTET_MODEL", "QUARTET_GRACE", "QUARTET_TOKEN", "QUARTET_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    return seen


def test_serve_precedence(tmp_path: Path, captured: dict[str, Any]) -> None:
    config = tmp_path / "svc.yaml"
    config.write_text(
        "role: tests.integration.echo_role\n"
        "model: {path: from-file, device: cpu}\n"
        "server: {port: 1111, grace_seconds: 5, workers: 3}\n"
        "options: {max_queue: 3}\n"
    )
    token_file = tmp_path / "token"
    token_file.write_text("  secret-from-file\n")
    env = {"QUARTET_PORT": "2222", "QUARTET_MODEL": "from-env", "QUARTET_GRACE": "6"}
    args = ["serve", "--config", str(config), "--port", "3333", "--grace", "7", "--token-file", str(token_file),
            "--set", "server.port=4444", "--set", "options.load_seconds=0.5"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    server: ServerConfig = captured["server"]
    assert captured["role"] == "tests.integration.echo_role"  # from the file
    assert server.port == 4444                                 # --set beats flag, env and file
    assert server.grace_seconds == 7                           # flag beats env and file
    assert captured["model"].path == "from-env"                # env beats file
    assert captured["model"].device == "cpu" and server.workers == 3  # file beats defaults
    assert server.host == "127.0.0.1"                          # default
    assert server.token == "secret-from-file"
    assert captured["options"] == {"max_queue": 3, "load_seconds": 0.5}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "options.max_queue=0"], "options.max_queue: Input should be greater than 0"),
        (["--set", "server.port=abc"], "server.port: Input should be a valid integer"),
        (["--set", "server.bogus=1"], "server.bogus: unknown field. Valid fields here: admin_token,"),
        (["--set", "server.prot=1"], "server.prot: unknown field; did you mean 'port'?"),
        (["--port", "1", "--set", "server.port=abc"], "server.port: Input should be a valid integer, unable to parse string as an integer (got 'abc')"),
        (["--set", "port"], "expected key=value"),
        (["--tls-cert", "x.pem"], "tls_cert and tls_key must be given together"),
        (["--token-file", "/nonexistent/token"], "server.token_file: cannot read"),
    ],
)
def test_serve_config_errors_name_the_field(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["serve", ROLE, "--metrics-port", "-1", *args], env=WIDE)
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")


def test_serve_unknown_or_missing_role_is_a_config_error() -> None:
    result = runner.invoke(app, ["serve", "nope"], env=WIDE)
    assert result.exit_code == 2 and "unknown role 'nope'" in result.output
    result = runner.invoke(app, ["serve"], env=WIDE)
    assert result.exit_code == 2 and "give ROLE" in result.output


def test_parse_set_reads_yaml_scalars() -> None:
    assert parse_set(["a.b=5000", "a.c=true", "d=[1, 2]", "e=null", "f=word", "g=", "a.h=1.5"]) == {
        "a": {"b": 5000, "c": True, "h": 1.5}, "d": [1, 2], "e": None, "f": "word", "g": ""}
    with pytest.raises(ConfigError):
        parse_set(["a..b=1"])


def test_token_and_token_file_are_exclusive(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("x")
    with pytest.raises(ConfigError, match="server: set only one of token and token_file"):
        load_service_config(flags={"server.token": "y", "server.token_file": tmp_path / "t"})
    assert repr(ServerConfig(token="hidden-value")).count("hidden-value") == 0
