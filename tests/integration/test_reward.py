"""Reward service over real gRPC on 127.0.0.1: each backend kind, plugins that misbehave, timeouts,
bad requests, health, GetInfo and metrics. Worker pools are 1-2 processes, started once per server."""

from __future__ import annotations

import importlib.util
import re
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from quartet.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common import hf
from services.common.channel import health_status, open_channel
from services.common.codec import decode_tensor, encode_ragged
from services.common.config import ServerConfig
from services.common.role import ModelConfig
from services.common.server import RunningServer, start_server
from tests.integration.serving import metric

TOKEN = "reward-call-token"
PLUGIN_TIMEOUT = 1.0

# A plugin whose behaviour is chosen by the completion text, so one server covers every failure.
PLUGIN_SOURCE = '''
import math, os, time

def score(prompts, completions, metadata):
    out = []
    for p, c, m in zip(prompts, completions, metadata):
        if c == "raise":
            raise ValueError("plugin refuses " + c)
        if c == "nan":
            out.append(math.nan)
        elif c == "count":
            out.extend([1.0, 2.0])
        elif c == "sleep":
            time.sleep(30)
        elif c == "exit":
            os._exit(3)
        else:
            out.append(len(c) / 10 + float(m.get("bonus", 0)))
    return out
'''


def _serve(options: dict, *, model: ModelConfig | None = None, wait_ready: bool = True) -> RunningServer:
    return start_server("reward", model=model, options=options, server=ServerConfig(token=TOKEN, metrics_port=None),
                        wait_ready=wait_ready)


def _stub(srv: RunningServer) -> tuple[grpc.Channel, reward_pb2_grpc.RewardStub]:
    channel = open_channel(srv.address, token=TOKEN)
    return channel, reward_pb2_grpc.RewardStub(channel)


def _request(completions: list[str], answers: list[str] | None = None, prompts: list[str] | None = None,
             metadata: list[reward_pb2.Metadata] | None = None, **kw) -> reward_pb2.ScoreRequest:
    meta = [reward_pb2.Metadata(values={"answer": a}) for a in answers] if answers is not None else metadata or []
    return reward_pb2.ScoreRequest(completion_text=completions, metadata=meta,
                                   prompt_text=prompts if prompts is not None else ["q="] * len(completions), **kw)


def _rewards(response: reward_pb2.ScoreResponse) -> list[float]:
    return decode_tensor(response.rewards, dtypes=(torch.float32,), ndim=1).tolist()


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


# --- rule: arithmetic ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arith() -> Iterator[tuple[RunningServer, reward_pb2_grpc.RewardStub]]:
    srv = _serve({"kind": "rule", "rule": "arithmetic", "workers": 2, "max_batch": 128, "failure_reward": -1.0})
    channel, stub = _stub(srv)
    yield srv, stub
    channel.close()
    srv.stop(grace=0)


def test_arithmetic_rule_scores_right_wrong_garbage(arith) -> None:
    srv, stub = arith
    before = metric(srv, "quartet_reward_samples_total", {"kind": "rule"})
    resp = stub.Score(_request(["71", "70", "banana", "", "071<eos>", "-3"], ["71", "71", "71", "71", "71", "-3"]),
                      timeout=10)
    assert _rewards(resp) == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert list(resp.failed) == [False] * 6
    info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5)
    assert resp.identity == info.identity and info.identity.startswith("reward/rule:arithmetic@")
    assert (info.role, info.backend, info.model_path) == ("reward", "rule:arithmetic", "rule:arithmetic")
    assert info.limits.max_batch_sequences == 128 and info.limits.max_message_bytes > 0
    assert info.extra["kind"] == "rule" and info.extra["answer_key"] == "answer"
    assert metric(srv, "quartet_reward_samples_total", {"kind": "rule"}) - before == 6
    assert metric(srv, "quartet_reward_value_count", {"kind": "rule"}) >= 6


def test_arithmetic_score_latency_64_samples(arith) -> None:
    """The orchestrator calls Score every step: 64 samples must cost milliseconds, not a round trip each."""
    _, stub = arith
    request = _request([str(i) for i in range(64)], [str(i) if i % 2 else "-1" for i in range(64)])
    stub.Score(request, timeout=10)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        resp = stub.Score(request, timeout=10)
        times.append(time.perf_counter() - t)
    assert _rewards(resp) == [float(i % 2) for i in range(64)]
    assert statistics.median(times) < 0.05, f"median Score latency {statistics.median(times) * 1e3:.1f} ms"


def test_concurrent_calls_share_the_pool(arith) -> None:
    _, stub = arith
    requests = [_request([str(i + k) for i in range(16)], [str(i) for i in range(16)]) for k in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda r: _rewards(stub.Score(r, timeout=20)), requests))
    assert results == [[1.0 if k == 0 else 0.0] * 16 for k in range(6)]


def test_overloaded_beyond_max_concurrent() -> None:
    """Score calls past options.max_concurrent are refused at once (RESOURCE_EXHAUSTED), not queued."""
    srv = _serve({"kind": "rule", "rule": "arithmetic", "workers": 1, "max_concurrent": 2})
    channel, stub = _stub(srv)
    try:
        info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5)
        assert info.limits.max_queue == 2 and info.extra["max_concurrent"] == "2"
        gate = srv.role.gate
        with gate.enter(), gate.enter():  # both slots taken, as by two calls in flight
            code, details = _code(lambda: stub.Score(_request(["1"], ["1"]), timeout=10))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent=2" in details, details
            code, _ = _code(lambda: stub.Score(_request(["1", "2"], ["1"]), timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT  # a malformed message is still named as such
        assert _rewards(stub.Score(_request(["1"], ["1"]), timeout=10)) == [1.0]  # slots free again
    finally:
        channel.close()
        srv.stop(grace=0)


@pytest.mark.parametrize(("make", "field"), [
    (lambda: _request(["1", "2"], ["1", "2"], prompts=["p"]), "prompt_text"),
    (lambda: _request(["1", "2"], ["1"]), "metadata"),
    (lambda: _request(["1"], ["1"], completion_ids=encode_ragged([torch.tensor([1]), torch.tensor([2])])),
     "completion_ids"),
    (lambda: _request(["1"], [], prompts=["p"], metadata=[reward_pb2.Metadata(values={"other": "1"})]), "metadata[0]"),
    (lambda: reward_pb2.ScoreRequest(), "completion_text"),
    (lambda: reward_pb2.ScoreRequest(prompt_text=["p"]), "completion_text"),
    (lambda: _request(["1"] * 129, ["1"] * 129), "completion_text"),
    (lambda: _request(["1"], ["1"], prompts=["p"] * 129), "prompt_text"),
    (lambda: _request(["1"], ["1"], completion_ids=common_pb2.Ragged(offsets=bytes(130))), "completion_ids.offsets"),
    (lambda: _request(["1"], ["1"], prompt_ids=common_pb2.Ragged(
        values=common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[2], data=b"\0" * 16), offsets=[0, 3])),
     "prompt_ids.offsets"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(arith, make, field: str) -> None:
    _, stub = arith
    code, details = _code(lambda: stub.Score(make(), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field}:"), details
    assert _rewards(stub.Score(_request(["5"], ["5"]), timeout=10)) == [1.0]  # the next good call works


# --- rule: math and format ----------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sympy", pytest.param("math_verify", marks=pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None, reason="math-verify not installed"))])
def test_math_rule_and_pathological_answer_timeout(engine: str) -> None:
    """9^9^9^9 hangs both engines in C code; the hard timeout fails that sample only, and the worker is replaced."""
    srv = _serve({"kind": "rule", "rule": "math", "math_engine": engine, "workers": 2, "timeout_seconds": 1.0,
                  "failure_reward": -1.0})
    channel, stub = _stub(srv)
    try:
        info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5)
        assert info.extra["math_engine"] == engine
        resp = stub.Score(_request([r"so \boxed{\frac{1}{2}}", "0.25"], ["0.5", "0.5"]), timeout=10)
        assert _rewards(resp) == [1.0, 0.0] and list(resp.failed) == [False, False]

        t = time.perf_counter()
        resp = stub.Score(_request([r"\boxed{9^{9^{9^{9}}}}", "71"], ["71", "71"]), timeout=20)
        elapsed = time.perf_counter() - t
        assert _rewards(resp) == [-1.0, 1.0] and list(resp.failed) == [True, False]
        # Two workers: the good sample is scored by the other one, so the call costs the timeout plus
        # the kill, not a fresh worker's start (a math-verify import takes seconds on a busy box).
        assert elapsed < 1.0 + 3.0, elapsed
        assert metric(srv, "quartet_reward_timeouts_total", {"kind": "rule"}) == 1
        assert metric(srv, "quartet_reward_failed_samples_total", {"kind": "rule", "reason": "timeout"}) == 1
        assert metric(srv, "quartet_reward_worker_restarts_total", {"reason": "timeout"}) == 1
        assert _rewards(stub.Score(_request(["3"], ["3"]), timeout=10)) == [1.0]
    finally:
        channel.close()
        srv.stop(grace=0)


def test_format_rule() -> None:
    srv = _serve({"kind": "rule", "rule": "format", "format_regex": r"-?\d+", "max_chars": 4, "workers": 1,
                  "correct_reward": 0.5, "incorrect_reward": -0.5})
    channel, stub = _stub(srv)
    try:
        resp = stub.Score(reward_pb2.ScoreRequest(completion_text=["12", " -7\n", "12 is it", "12345"]), timeout=10)
        assert _rewards(resp) == [0.5, 0.5, -0.5, -0.5]
    finally:
        channel.close()
        srv.stop(grace=0)


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="math-verify not installed")
def test_math_rule_on_extracted_answer_and_final_answer_format_rule() -> None:
    """GSM8K-style completions: only the stated final answer counts; the format rule rewards stating one."""
    completions = ["9 * 2 = 18 dollars. The answer is 18.", "She has 18 eggs and eats 3.", "#### 1,000",
                   r"so $x = \boxed{\frac{1}{2}}$", "I think it is 7"]
    answers = ["18", "18", "1000", "0.5", "7"]
    math = _serve({"kind": "rule", "rule": "math", "math_engine": "math_verify", "workers": 1,
                   "extract": ["boxed", "answer_is", "hash"]})
    fmt = _serve({"kind": "rule", "rule": "final_answer", "workers": 1})
    channels = []
    try:
        for srv, expected in ((math, [1.0, 0.0, 1.0, 1.0, 0.0]), (fmt, [1.0, 0.0, 1.0, 1.0, 0.0])):
            channel, stub = _stub(srv)
            channels.append(channel)
            assert _rewards(stub.Score(_request(completions, answers), timeout=20)) == expected
        assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5).extra["rule"] == "final_answer"
    finally:
        for channel in channels:
            channel.close()
        math.stop(grace=0)
        fmt.stop(grace=0)


# --- plugin ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Iterator[tuple[RunningServer, reward_pb2_grpc.RewardStub]]:
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "quartet_test_plugin.py").write_text(PLUGIN_SOURCE)
    srv = _serve({"kind": "plugin", "plugin": "quartet_test_plugin:score", "plugin_path": str(folder), "workers": 2,
                  "timeout_seconds": PLUGIN_TIMEOUT, "failure_reward": -1.0})
    channel, stub = _stub(srv)
    yield srv, stub
    channel.close()
    srv.stop(grace=0)


def _plugin_ok(stub) -> None:
    resp = stub.Score(_request(["ab", "abcd"], prompts=["x", "y"],
                               metadata=[reward_pb2.Metadata(values={"bonus": "1"}), reward_pb2.Metadata()]), timeout=10)
    assert _rewards(resp) == pytest.approx([1.2, 0.4]) and list(resp.failed) == [False, False]


def test_plugin_scores_and_reports_identity(plugin) -> None:
    _, stub = plugin
    _plugin_ok(stub)
    info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5)
    assert info.backend == "plugin:quartet_test_plugin:score" and info.extra["plugin"] == "quartet_test_plugin:score"
    request = _request([f"s{i}" for i in range(64)])
    stub.Score(request, timeout=10)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        stub.Score(request, timeout=10)
        times.append(time.perf_counter() - t)
    assert statistics.median(times) < 0.05, f"median Score latency {statistics.median(times) * 1e3:.1f} ms"


@pytest.mark.parametrize(("completion", "reason", "match"), [
    ("raise", "plugin_error", "raised ValueError: plugin refuses raise"),
    ("nan", "invalid_output", r"non-finite rewards at samples \[1\]"),
    ("count", "invalid_output", "returned 2 rewards for 1 samples"),
    ("exit", "plugin_crash", r"crashed its worker process \(exit code 3\)"),
])
def test_misbehaving_plugin_is_internal_naming_it(plugin, completion: str, reason: str, match: str) -> None:
    srv, stub = plugin
    before = metric(srv, "quartet_reward_errors_total", {"kind": "plugin", "reason": reason})
    code, details = _code(lambda: stub.Score(_request(["fine", completion, "ok"]), timeout=10))
    assert code == grpc.StatusCode.INTERNAL
    assert "reward backend plugin:quartet_test_plugin:score" in details
    assert re.search(match, details), details
    assert metric(srv, "quartet_reward_errors_total", {"kind": "plugin", "reason": reason}) - before == 1
    _plugin_ok(stub)  # the service stays up and the next call works


def test_plugin_past_timeout_scores_failure(plugin) -> None:
    srv, stub = plugin
    timeouts = metric(srv, "quartet_reward_timeouts_total", {"kind": "plugin"})
    t = time.perf_counter()
    resp = stub.Score(_request(["sleep"]), timeout=20)
    elapsed = time.perf_counter() - t
    assert _rewards(resp) == [-1.0] and list(resp.failed) == [True]
    assert elapsed < PLUGIN_TIMEOUT + 1.5, elapsed  # ~1.01 s measured; slack for a loaded 2-core CI box
    assert metric(srv, "quartet_reward_timeouts_total", {"kind": "plugin"}) - timeouts == 1
    # A sleeper among good samples fails alone; the others are scored.
    resp = stub.Score(_request(["ab", "sleep", "abc", "abcd"]), timeout=20)
    assert _rewards(resp) == pytest.approx([0.2, -1.0, 0.3, 0.4]) and list(resp.failed) == [False, True, False, False]
    _plugin_ok(stub)


def test_plugin_that_cannot_be_imported_stops_startup(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot import module 'not_here'"):
        _serve({"kind": "plugin", "plugin": "not_here:score", "plugin_path": str(tmp_path)})


def test_health_not_serving_until_loaded(tmp_path) -> None:
    """The plugin takes a while to import: health stays NOT_SERVING and Score is UNAVAILABLE until loaded."""
    (tmp_path / "quartet_slow_plugin.py").write_text("import time\ntime.sleep(1.5)\ndef score(p, c, m):\n"
                                                      "    return [1.0] * len(c)\n")
    srv = _serve({"kind": "plugin", "plugin": "quartet_slow_plugin:score", "plugin_path": str(tmp_path),
                  "workers": 1}, wait_ready=False)
    channel, stub = _stub(srv)
    try:
        assert health_status(channel, "quartet.v1.Reward") == "NOT_SERVING"
        code, _ = _code(lambda: stub.Score(_request(["x"]), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert srv.wait_ready(timeout=30)
        assert health_status(channel, "quartet.v1.Reward") == "SERVING"
        assert _rewards(stub.Score(_request(["x"]), timeout=10)) == [1.0]
    finally:
        channel.close()
        srv.stop(grace=0)


def test_example_plugin_in_repo() -> None:
    folder = Path(__file__).resolve().parents[2] / "examples" / "plugins"
    srv = _serve({"kind": "plugin", "plugin": "length_penalised:score", "plugin_path": str(folder), "workers": 1})
    channel, stub = _stub(srv)
    try:
        resp = stub.Score(_request(["71", "71 because", "70"], ["71", "71", "71"]), timeout=10)
        assert _rewards(resp) == pytest.approx([1.0, 0.92, 0.0])
    finally:
        channel.close()
        srv.stop(grace=0)


# --- model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama sequence-classification model (num_labels=1) with the char tokenizer.

    Llama, not Qwen2: for a saved qwen2 config AutoTokenizer rebuilds a byte-level tokenizer.
    """
    from demo.modelkit import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # larger head: rewards that differ visibly
    out = tmp_path_factory.mktemp("reward-model") / "rm"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_model_backend_equals_direct_forward(reward_checkpoint: Path) -> None:
    srv = _serve({"kind": "model", "model_batch_size": 2},
                 model=ModelConfig(path=str(reward_checkpoint), dtype="float32", device="cpu"))
    channel, stub = _stub(srv)
    try:
        prompts, completions = ["1+2=", "10+20=", "3+4=", "5+5="], ["3", "30 is it", "7", "1"]
        resp = stub.Score(_request(completions, prompts=prompts), timeout=30)
        got = _rewards(resp)
        model = AutoModelForSequenceClassification.from_pretrained(str(reward_checkpoint), dtype=torch.float32)
        tokenizer = hf.load_tokenizer(reward_checkpoint)
        with torch.no_grad():
            want = [model(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item()
                    for p, c in zip(prompts, completions, strict=True)]
        assert got == pytest.approx(want, abs=1e-5)  # padded micro-batches of 2 == one unpadded sequence each
        assert len(set(round(g, 4) for g in got)) == 4
        info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5)
        assert info.backend == "model:rm" and info.tokenizer_fingerprint == hf.tokenizer_fingerprint(tokenizer)
        assert (info.dtype, info.device, info.model_path) == ("float32", "cpu", str(reward_checkpoint))
        assert metric(srv, "quartet_reward_samples_total", {"kind": "model"}) == 4
        code, details = _code(lambda: stub.Score(reward_pb2.ScoreRequest(completion_text=["3"]), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prompt_text:")
    finally:
        channel.close()
        srv.stop(grace=0)
