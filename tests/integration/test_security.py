"""Security of the real roles over gRPC on 127.0.0.1: tokens never appear in logs (captured at DEBUG),
the Prometheus exposition or error messages; a reward service's call token cannot push weights to the
generator; serving beyond loopback without TLS or a token warns loudly.

Covered elsewhere, not repeated here: the auth matrix and TLS / mTLS on the runtime's echo role
(test_auth_tls.py); Save / Load names that escape the checkpoint directory, one by one
(test_value.py::test_names_escaping_the_checkpoint_dir_are_denied) and drawn at random
(tests/fuzz/test_fuzz_value.py).
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import typer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import cli.serve
from cli.main import app
from quartet.v1 import common_pb2, generator_pb2, generator_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.common.channel import open_channel
from services.common.codec import encode_ragged
from services.common.config import ServerConfig
from services.common.role import ModelConfig
from services.common.server import BindError, RunningServer, _warn_exposed, start_server
from services.common.weights import iter_weight_chunks
from tests.integration.echo_role import ROLE as ECHO_ROLE

CALL, ADMIN = "sec-call-5f2a9c41d7", "sec-admin-77b1e0a3c2"
WRONG = "sec-wrong-c0ffee9b18"
REWARD_OWN = "sec-reward-only-1d2e3f"
SECRETS = (CALL, ADMIN, WRONG, REWARD_OWN)


def _no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a token appears in {where}"


@pytest.fixture(scope="module")
def generator(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    srv = start_server("generator", model=ModelConfig(path=str(tiny_checkpoint), dtype="float32", device="cpu"),
                       options={"preallocate_weight_buffers": False},
                       server=ServerConfig(token=CALL, admin_token=ADMIN, metrics_port=0))
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def reward() -> Iterator[RunningServer]:
    srv = start_server("reward", options={"kind": "rule", "workers": 1},
                       server=ServerConfig(token=CALL, admin_token=ADMIN, metrics_port=0))
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def other_weights(tiny_checkpoint_other: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint_other), dtype=torch.float32).state_dict()


def _status(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _scrape(srv: RunningServer) -> str:
    assert srv.metrics_port is not None
    return urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5).read().decode()


def _generator_calls(srv: RunningServer, weights: dict[str, torch.Tensor]) -> list[tuple[str, grpc.StatusCode, str]]:
    """Every auth outcome and a bad input on the generator; returns (what, code, details)."""
    good = generator_pb2.GenerateRequest(prompt_ids=encode_ragged([torch.tensor([5, 6, 7])], dtype=torch.int64),
                                         params=generator_pb2.SamplingParams(n=1, max_new_tokens=2, seed=1))
    bad = generator_pb2.GenerateRequest(prompt_ids=good.prompt_ids, params=generator_pb2.SamplingParams(n=0))
    chunks = list(iter_weight_chunks(weights.items(), version=1))
    corrupt = list(iter_weight_chunks(weights.items(), version=1))
    corrupt[0].pieces[0].crc32 ^= 1
    out = []
    for who, token in (("none", None), ("wrong", WRONG), ("call", CALL), ("admin", ADMIN)):
        channel = open_channel(srv.address, token=token)
        stub = generator_pb2_grpc.GeneratorStub(channel)
        calls = {"GetInfo": lambda s=stub: s.GetInfo(common_pb2.GetInfoRequest(), timeout=10),
                 "Generate": lambda s=stub: s.Generate(good, timeout=30),
                 "Generate(bad)": lambda s=stub: s.Generate(bad, timeout=10),
                 "UpdateWeights(corrupt)": lambda s=stub: s.UpdateWeights(iter(corrupt), timeout=30)}
        if who == "call":
            calls["UpdateWeights"] = lambda s=stub: s.UpdateWeights(iter(chunks), timeout=30)
        out += [(f"{who}:{what}", *_status(fn)) for what, fn in calls.items()]
        channel.close()
    return out


def test_tokens_never_in_generator_logs_metrics_or_errors(generator: RunningServer, other_weights,
                                                          caplog: pytest.LogCaptureFixture,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    with caplog.at_level(logging.DEBUG):
        outcomes = _generator_calls(generator, other_weights)
    codes = {what: code for what, code, _ in outcomes}
    # The calls did reach every branch of auth and validation, so the checks below mean something.
    assert codes["none:GetInfo"] == codes["wrong:Generate"] == grpc.StatusCode.UNAUTHENTICATED
    assert codes["call:UpdateWeights"] == grpc.StatusCode.PERMISSION_DENIED
    assert codes["call:Generate"] == codes["admin:GetInfo"] == grpc.StatusCode.OK
    assert codes["call:Generate(bad)"] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["admin:UpdateWeights(corrupt)"] == grpc.StatusCode.INVALID_ARGUMENT
    for what, _, details in outcomes:
        _no_secret(details, f"the error details of {what}")
    assert caplog.records, "nothing was logged: the capture did not work"
    _no_secret(caplog.text, "the Python logs")
    captured = capfd.readouterr()
    _no_secret(captured.out + captured.err, "the process's stdout/stderr")
    exposition = _scrape(generator)
    assert 'code="UNAUTHENTICATED"' in exposition and 'code="PERMISSION_DENIED"' in exposition
    _no_secret(exposition, "the Prometheus exposition")
    _no_secret(repr(generator.config) + str(generator.config), "the server config's repr")


def test_tokens_never_in_reward_logs_metrics_or_errors(reward: RunningServer, caplog: pytest.LogCaptureFixture,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    good = reward_pb2.ScoreRequest(completion_text=["7"], metadata=[reward_pb2.Metadata(values={"answer": "7"})])
    bad = reward_pb2.ScoreRequest(completion_text=["7", "8"], metadata=[reward_pb2.Metadata(values={"answer": "7"})])
    seen = []
    with caplog.at_level(logging.DEBUG):
        for token in (None, WRONG, CALL, ADMIN):
            channel = open_channel(reward.address, token=token)
            stub = reward_pb2_grpc.RewardStub(channel)
            seen += [_status(lambda s=stub, r=r: s.Score(r, timeout=10)) for r in (good, bad)]
            channel.close()
    assert [c for c, _ in seen] == [grpc.StatusCode.UNAUTHENTICATED] * 4 + [
        grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT] * 2
    for _, details in seen:
        _no_secret(details, "Score's error details")
    _no_secret(caplog.text, "the Python logs")
    captured = capfd.readouterr()
    _no_secret(captured.out + captured.err, "the process's stdout/stderr")
    _no_secret(_scrape(reward), "the Prometheus exposition")


def test_reward_call_token_cannot_push_weights(generator: RunningServer, reward: RunningServer, other_weights) -> None:
    """A reward service holds only the call token of the stack: on the generator it is the wrong scope."""
    reward_token = reward.config.token
    assert reward_token == CALL and reward.config.admin_token != reward_token
    channel = open_channel(generator.address, token=reward_token)
    stub = generator_pb2_grpc.GeneratorStub(channel)
    code, details = _status(lambda: stub.UpdateWeights(iter_weight_chunks(other_weights.items(), version=5),
                                                       timeout=30))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
    assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10).weight_version == 0
    channel.close()
    # A reward service given a token of its own is not even a caller of the generator.
    channel = open_channel(generator.address, token=REWARD_OWN)
    code, _ = _status(lambda: generator_pb2_grpc.GeneratorStub(channel).UpdateWeights(
        iter_weight_chunks(other_weights.items(), version=5), timeout=30))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


# ---- binding beyond loopback (never actually bound: only 127.0.0.1 is ever bound in tests) ----

@pytest.mark.parametrize(("host", "tls", "token", "warns"), [
    ("127.0.0.1", False, False, False), ("localhost", False, False, False), ("::1", False, False, False),
    ("[::1]", False, False, False), ("127.3.4.5", False, False, False),
    ("0.0.0.0", False, False, True), ("::", False, False, True), ("[::]", False, True, True),
    ("10.1.2.3", True, False, True), ("192.168.0.7", False, True, True), ("example.org", False, False, True),
    ("0.0.0.0", True, True, False),
])
def test_exposure_warning_goes_to_log_and_stderr(host: str, tls: bool, token: bool, warns: bool, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not read: the warning only looks at the configuration")
    cfg = ServerConfig(host=host, token=CALL if token else None, tls_cert=pem if tls else None,
                       tls_key=pem if tls else None)
    with caplog.at_level(logging.WARNING):
        _warn_exposed(cfg)
    err = capfd.readouterr().err
    assert bool(caplog.records) == warns and ("WARNING" in err) == warns
    if warns:
        assert host in err and "--tls-cert" in err  # says what to change
    _no_secret(caplog.text + err, "the exposure warning")


def _refuse_to_bind(cfg, interceptors):  # stands in for build_grpc_server
    raise BindError(f"test: refusing to bind {cfg.host}")


def test_quartet_serve_warns_before_binding_a_public_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole `quartet serve` path up to the bind, with binding replaced by a refusal: nothing is bound."""
    monkeypatch.setattr("services.common.server.build_grpc_server", _refuse_to_bind)

    def no_exit(code: int) -> None:
        raise typer.Exit(code)

    monkeypatch.setattr(cli.serve, "_exit_process", no_exit)
    for key in ("QUARTET_TOKEN", "QUARTET_ADMIN_TOKEN", "QUARTET_HOST", "QUARTET_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(app, ["serve", ECHO_ROLE, "--host", "0.0.0.0", "--metrics-port", "-1"],
                                env={"COLUMNS": "250"})
    assert result.exit_code != 0
    output = result.output.replace("\n", " ")
    assert "WARNING" in output and "0.0.0.0" in output and "without TLS and an auth token" in output
    assert "refusing to bind" in output  # the warning came first, then the (fake) bind
