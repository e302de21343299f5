"""Generator service over real gRPC on 127.0.0.1: sampling (n per prompt, seeds, raw logprobs equal to a
direct forward pass), UpdateWeights (applied atomically; bad or interrupted streams change nothing),
batching of concurrent callers, the bounded queue, validation, health, GetInfo, metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from quartet.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.common import hf
from services.common.channel import health_status, open_channel
from services.common.codec import decode_ragged, encode_ragged
from services.common.config import ServerConfig
from services.common.role import ModelConfig
from services.common.server import RunningServer, start_server
from services.common.weights import iter_weight_chunks, push_weights
from services.generator.transformers_backend import TransformersBackend

CALL, ADMIN = "gen-call-token", "gen-admin-token"
PROMPTS = ["12+34=", "7*8=", "1"]


def _start(path: Path, **options) -> RunningServer:
    return start_server("generator", model=ModelConfig(path=str(path), dtype="float32", device="cpu"),
                        options=options, server=ServerConfig(token=CALL, admin_token=ADMIN))


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path):
    return hf.load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    srv = _start(tiny_checkpoint)
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def fresh(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    """A server of our own, for tests that change weights or block the worker."""
    srv = _start(tiny_checkpoint, max_queue=3)
    yield srv
    srv.stop(grace=0)


def _stubs(srv: RunningServer) -> tuple[generator_pb2_grpc.GeneratorStub, grpc.Channel]:
    """(call-token stub, admin channel for UpdateWeights)."""
    return (generator_pb2_grpc.GeneratorStub(open_channel(srv.address, token=CALL)),
            open_channel(srv.address, token=ADMIN))


def _request(prompts: list[list[int]], **params) -> generator_pb2.GenerateRequest:
    params = {"n": 1, "temperature": 1.0, "max_new_tokens": 6, "seed": 11, **params}
    return generator_pb2.GenerateRequest(prompt_ids=encode_ragged([torch.tensor(p) for p in prompts], dtype=torch.int64),
                                         params=generator_pb2.SamplingParams(**params))


def _rows(resp: generator_pb2.GenerateResponse) -> tuple[list[list[int]], list[torch.Tensor]]:
    ids = [r.tolist() for r in decode_ragged(resp.completion_ids, dtypes=(torch.int64,)).rows()]
    return ids, decode_ragged(resp.logprobs, dtypes=(torch.float32,)).rows()


def _direct_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log pi(completion_t | prefix) from one unpadded forward pass of plain transformers, fp32."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return logp[len(prompt) - 1:-1].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def _hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


def _metric(srv: RunningServer, name: str, labels: dict[str, str] | None = None) -> float:
    return srv.registry.get_sample_value(name, labels or {}) or 0.0


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------ sampling


def test_n_samples_per_prompt_prompt_major(server, prompt_ids) -> None:
    stub, _ = _stubs(server)
    resp = stub.Generate(_request(prompt_ids, n=4, max_new_tokens=5), timeout=30)
    ids, lps = _rows(resp)
    assert list(resp.prompt_index) == [0] * 4 + [1] * 4 + [2] * 4
    assert len(ids) == len(lps) == len(resp.finish_reasons) == 12
    assert resp.weight_version == 0 and resp.logprob_mode == "raw"
    for row, lp, reason in zip(ids, lps, resp.finish_reasons, strict=True):
        assert 1 <= len(row) <= 5 and len(lp) == len(row) and bool((lp <= 0).all())
        assert all(0 <= t < 54 for t in row)
        stopped = row[-1] == 2  # EOS
        assert reason == (generator_pb2.FINISH_REASON_STOP if stopped else generator_pb2.FINISH_REASON_LENGTH)
    assert len({tuple(r) for r in ids[:4]}) > 1  # four different samples of prompt 0


def test_same_seed_same_tokens_alone_or_batched(server, prompt_ids) -> None:
    stub, _ = _stubs(server)
    first = _rows(stub.Generate(_request(prompt_ids, n=3, seed=5), timeout=30))[0]
    again = _rows(stub.Generate(_request(prompt_ids, n=3, seed=5), timeout=30))[0]
    other = _rows(stub.Generate(_request(prompt_ids, n=3, seed=6), timeout=30))[0]
    assert first == again and first != other
    # sample j of prompt i does not depend on n, on the other prompts, or on other requests in the batch
    # (the seed is per (prompt index in the request, sample index))
    fewer = _rows(stub.Generate(_request(prompt_ids[:2], n=2, seed=5), timeout=30))[0]
    assert fewer == first[0:2] + first[3:5]
    backend = server.role.backend
    from services.generator.backend import GenerationRequest, SamplingParams

    mine = GenerationRequest(prompt_ids, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=5))
    noise = GenerationRequest([[1, 9, 9, 9, 9, 9, 9, 9, 9]], SamplingParams(n=5, temperature=0.5, top_k=4,
                                                                            max_new_tokens=3, seed=99))
    batched = backend.generate_many([noise, mine, noise])[1]
    assert [s.token_ids for s in batched] == first


def test_logprobs_equal_direct_forward(server, prompt_ids, tiny_checkpoint) -> None:
    stub, _ = _stubs(server)
    model = _hf_model(tiny_checkpoint)
    # sampling with temperature / top-k / top-p must not change which distribution logprobs come from
    for params in ({"temperature": 1.0}, {"temperature": 0.6, "top_k": 5, "top_p": 0.9}, {"temperature": 0.0}):
        resp = stub.Generate(_request(prompt_ids, n=2, max_new_tokens=8, **params), timeout=30)
        ids, lps = _rows(resp)
        for k, (row, lp) in enumerate(zip(ids, lps, strict=True)):
            want = _direct_logprobs(model, prompt_ids[resp.prompt_index[k]], row)
            assert torch.allclose(lp, want, atol=1e-4), (params, k, (lp - want).abs().max())
            if params["temperature"] == 0.0:  # greedy picks the argmax of the same forward pass
                full = torch.tensor([prompt_ids[resp.prompt_index[k]] + row])
                with torch.no_grad():
                    logits = model(input_ids=full).logits[0]
                P = len(prompt_ids[resp.prompt_index[k]])
                assert logits[P - 1:-1].argmax(-1).tolist() == row


def test_stop_tokens_end_samples(server, prompt_ids) -> None:
    stub, _ = _stubs(server)
    resp = stub.Generate(_request(prompt_ids, n=2, max_new_tokens=6, stop_token_ids=list(range(54))), timeout=30)
    ids, _ = _rows(resp)
    assert all(len(r) == 1 for r in ids)  # every token is a stop token: one token each, kept
    assert set(resp.finish_reasons) == {generator_pb2.FINISH_REASON_STOP}


def test_stop_strings_end_samples_at_the_token_completing_them(server, prompt_ids, tokenizer) -> None:
    """The same seeded samples with and without a stop string: with it, each is the same tokens up to the
    one completing the string's first occurrence (the char tokenizer: one character per token), STOP."""
    stub, _ = _stubs(server)
    base = _request(prompt_ids[:1], n=4, max_new_tokens=12, seed=5)
    base.return_text = True
    free = stub.Generate(base, timeout=30)
    ids, lps = _rows(free)
    texts = list(free.completion_text)
    longest = max(range(4), key=lambda k: len(texts[k]))
    stop = texts[longest][2:4]
    assert len(stop) == 2, texts
    base.params.stop.append(stop)
    cut = stub.Generate(base, timeout=30)
    cut_ids, cut_lps = _rows(cut)
    assert sum(len(c) < len(i) for c, i in zip(cut_ids, ids, strict=True)) >= 1  # the longest one at least
    for k in range(4):
        at = texts[k].find(stop)
        if at < 0:  # this sample never wrote the stop string: unchanged
            assert cut_ids[k] == ids[k] and cut.finish_reasons[k] == free.finish_reasons[k]
            continue
        end = at + len(stop)
        assert cut_ids[k] == ids[k][:end] and cut.finish_reasons[k] == generator_pb2.FINISH_REASON_STOP
        assert cut.completion_text[k] == texts[k][:end] and cut.completion_text[k].endswith(stop)  # the stop text kept
        assert torch.equal(cut_lps[k], lps[k][:end])
    with pytest.raises(grpc.RpcError) as info:
        base.params.stop.append("")
        stub.Generate(base, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("params.stop[1]")


def test_return_text(server, prompt_ids, tokenizer) -> None:
    stub, _ = _stubs(server)
    resp = stub.Generate(generator_pb2.GenerateRequest(
        prompt_ids=_request(prompt_ids).prompt_ids, return_text=True,
        params=generator_pb2.SamplingParams(n=1, temperature=1.0, max_new_tokens=4, seed=1)), timeout=30)
    ids, _ = _rows(resp)
    assert list(resp.completion_text) == [tokenizer.decode(r, skip_special_tokens=True) for r in ids]


@pytest.mark.parametrize(("mutate", "code", "field"), [
    (lambda r: r.ClearField("prompt_ids"), grpc.StatusCode.INVALID_ARGUMENT, "prompt_ids"),
    (lambda r: r.prompt_ids.offsets.extend([r.prompt_ids.offsets[-1]]), grpc.StatusCode.INVALID_ARGUMENT,
     "prompt_ids[3]"),
    (lambda r: r.prompt_ids.CopyFrom(encode_ragged([torch.tensor([1, 54])])), grpc.StatusCode.OUT_OF_RANGE,
     "prompt_ids[0]"),
    (lambda r: setattr(r.params, "n", 0), grpc.StatusCode.INVALID_ARGUMENT, "params.n"),
    (lambda r: setattr(r.params, "n", 1000), grpc.StatusCode.OUT_OF_RANGE, "params.n"),
    (lambda r: setattr(r.params, "max_new_tokens", 100000), grpc.StatusCode.OUT_OF_RANGE, "params.max_new_tokens"),
    (lambda r: setattr(r.params, "temperature", -1.0), grpc.StatusCode.INVALID_ARGUMENT, "params.temperature"),
    (lambda r: setattr(r.params, "top_p", 1.5), grpc.StatusCode.INVALID_ARGUMENT, "params.top_p"),
    (lambda r: r.prompt_text.append("x"), grpc.StatusCode.INVALID_ARGUMENT, "prompt_text"),
])
def test_bad_requests_name_the_field(server, prompt_ids, mutate, code, field) -> None:
    stub, _ = _stubs(server)
    req = _request(prompt_ids)
    mutate(req)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(req, timeout=30)
    assert info.value.code() == code and info.value.details().startswith(field), info.value.details()
    assert stub.Generate(_request(prompt_ids), timeout=30).weight_version == 0  # still serving


def test_get_info(server, tiny_checkpoint) -> None:
    stub, _ = _stubs(server)
    info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10)
    assert info.tokenizer_fingerprint == hf.tokenizer_fingerprint(hf.load_tokenizer(tiny_checkpoint))
    assert (info.role, info.backend, info.dtype, info.device, info.vocab_size) == (
        "generator", "transformers", "float32", "cpu", 54)
    assert info.extra["logprobs"] == "raw" and info.weight_version == 0
    assert info.limits.max_new_tokens == 1024 and info.limits.max_samples_per_prompt == 64
    assert info.limits.max_queue == 64 and info.limits.max_tokens_per_call == 16384


def test_health_not_serving_until_loaded(tiny_checkpoint, monkeypatch) -> None:
    gate = threading.Event()
    original = TransformersBackend.load

    def slow_load(self) -> None:
        gate.wait(30)
        original(self)

    monkeypatch.setattr(TransformersBackend, "load", slow_load)
    srv = start_server("generator", model=ModelConfig(path=str(tiny_checkpoint)), wait_ready=False)
    try:
        channel = open_channel(srv.address)
        assert health_status(channel, "quartet.v1.Generator") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            generator_pb2_grpc.GeneratorStub(channel).GetInfo(common_pb2.GetInfoRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # A weight update that reaches a generator still loading (a restarted one, say) is UNAVAILABLE,
        # which the orchestrator retries, through either transport; never INTERNAL.
        weights = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
        with pytest.raises(grpc.RpcError) as info:
            push_weights(channel, weights.items(), 1, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            generator_pb2_grpc.GeneratorStub(channel).UpdateWeightsShared(iter([generator_pb2.SharedWeights()]),
                                                                           timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        gate.set()
        assert srv.wait_ready(timeout=60)
        assert health_status(channel, "quartet.v1.Generator") == "SERVING"
    finally:
        gate.set()
        srv.stop(grace=0)


# ------------------------------------------------------------------------------------------ weights


def test_update_weights_changes_logprobs_and_version(fresh, prompt_ids, tiny_checkpoint_other) -> None:
    stub, admin = _stubs(fresh)
    request = _request(prompt_ids, n=2, max_new_tokens=6)
    before = stub.Generate(request, timeout=30)
    other = _hf_model(tiny_checkpoint_other)

    resp = push_weights(admin, other.state_dict().items(), 1, timeout=30, chunk_bytes=64 << 10)

    assert (resp.version, resp.tensors_updated) == (1, 20)  # 21 state-dict entries, lm_head tied
    assert resp.bytes_received == sum(p.numel() * 4 for p in other.parameters())
    after = stub.Generate(request, timeout=30)
    assert after.weight_version == 1 and before.weight_version == 0
    ids, lps = _rows(after)
    assert not torch.equal(torch.cat(lps), torch.cat(_rows(before)[1]))
    for k, (row, lp) in enumerate(zip(ids, lps, strict=True)):  # it now serves exactly the other model
        want = _direct_logprobs(other, prompt_ids[after.prompt_index[k]], row)
        assert torch.allclose(lp, want, atol=1e-4)
    assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10).weight_version == 1
    assert _metric(fresh, "quartet_generator_weight_version") == 1
    assert _metric(fresh, "quartet_generator_weight_update_bytes_total") == resp.bytes_received
    assert _metric(fresh, "quartet_generator_weight_update_seconds_count") == 1


def test_call_token_cannot_update_weights(fresh, tiny_checkpoint_other) -> None:
    call_channel = open_channel(fresh.address, token=CALL)
    with pytest.raises(grpc.RpcError) as info:
        push_weights(call_channel, _hf_model(tiny_checkpoint_other).state_dict().items(), 1, timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _perturbed(path: Path) -> dict[str, torch.Tensor]:
    model = _hf_model(path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    return model.state_dict()


def _bad_shape(state):
    yield from iter_weight_chunks({**state, "model.norm.weight": torch.ones(3)}.items(), version=1)


def _missing(state):
    yield from iter_weight_chunks({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
                                  .items(), version=1)


def _bad_crc(state):
    for k, chunk in enumerate(iter_weight_chunks(state.items(), version=1, chunk_bytes=16 << 10)):
        if k == 5:
            chunk.pieces[0].data = b"\x00" + chunk.pieces[0].data[1:]
        yield chunk


@pytest.mark.parametrize(("stream", "code", "says"), [
    (_bad_shape, grpc.StatusCode.INVALID_ARGUMENT, "weights[model.norm.weight].shape"),
    (_missing, grpc.StatusCode.INVALID_ARGUMENT, "missing model.layers.1.mlp.up_proj.weight"),
    (_bad_crc, grpc.StatusCode.INVALID_ARGUMENT, "crc32: checksum mismatch"),
])
def test_bad_stream_leaves_old_weights(fresh, prompt_ids, tiny_checkpoint, stream, code, says) -> None:
    stub, admin = _stubs(fresh)
    request = _request(prompt_ids, n=2, temperature=0.0)
    before = stub.Generate(request, timeout=30)
    state = _perturbed(tiny_checkpoint)

    with pytest.raises(grpc.RpcError) as info:
        generator_pb2_grpc.GeneratorStub(admin).UpdateWeights(stream(state), timeout=30)

    assert info.value.code() == code and says in info.value.details(), info.value.details()
    after = stub.Generate(request, timeout=30)
    assert after.weight_version == 0 and after == before  # same tokens, same logprobs, same version
    # the receive buffer is reused: a good update right after still works
    assert push_weights(admin, state.items(), 1, timeout=30).version == 1


def test_dropped_stream_leaves_old_weights(fresh, prompt_ids, tiny_checkpoint) -> None:
    stub, admin = _stubs(fresh)
    request = _request(prompt_ids, n=2, temperature=0.0)
    before = stub.Generate(request, timeout=30)
    state = _perturbed(tiny_checkpoint)
    stalled, resume = threading.Event(), threading.Event()

    def chunks():
        for k, chunk in enumerate(iter_weight_chunks(state.items(), version=1, chunk_bytes=16 << 10)):
            if k == 4:  # half way: stall, and let the test cancel the call
                stalled.set()
                resume.wait(10)
            yield chunk

    future = generator_pb2_grpc.GeneratorStub(admin).UpdateWeights.future(chunks(), timeout=30)
    assert stalled.wait(10)
    future.cancel()
    resume.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()

    def failures() -> float:
        # the server sees either the cancellation or a stream that ended without `last` (a race in grpc)
        return sum(_metric(fresh, "quartet_generator_weight_update_failures_total", {"reason": r})
                   for r in ("cancelled", "FailedPrecondition", "InvalidArgument"))

    _wait_for(lambda: failures() == 1)
    after = stub.Generate(request, timeout=30)
    assert after.weight_version == 0 and after == before
    assert push_weights(admin, state.items(), 1, timeout=30).version == 1  # the lock was released


# ------------------------------------------------------------------------------------------ batching


def _gate_backend(srv: RunningServer) -> tuple[threading.Event, threading.Event]:
    """Make the first backend batch wait: (entered, release)."""
    backend = srv.role.backend
    entered, release = threading.Event(), threading.Event()
    original = backend.generate_many

    def gated(requests):
        if not entered.is_set():
            entered.set()
            release.wait(30)
        return original(requests)

    backend.generate_many = gated
    return entered, release


def _call_in_thread(stub, request, results: dict, key) -> threading.Thread:
    def run() -> None:
        try:
            results[key] = stub.Generate(request, timeout=60)
        except grpc.RpcError as e:
            results[key] = e

    t = threading.Thread(target=run)
    t.start()
    return t


def test_concurrent_callers_are_batched(fresh, prompt_ids) -> None:
    stub, _ = _stubs(fresh)
    entered, release = _gate_backend(fresh)
    results: dict = {}
    threads = [_call_in_thread(stub, _request(prompt_ids[:1], seed=0), results, "first")]
    assert entered.wait(10)  # the worker is busy with the first call
    requests = {k: _request(prompt_ids[:2], n=2, seed=k) for k in range(3)}
    threads += [_call_in_thread(stub, r, results, k) for k, r in requests.items()]
    _wait_for(lambda: _metric(fresh, "quartet_generator_queue_depth") == 3)
    release.set()
    for t in threads:
        t.join(60)

    assert _metric(fresh, "quartet_generator_batch_requests_count") == 2
    assert _metric(fresh, "quartet_generator_batch_requests_bucket", {"le": "2.0"}) == 1  # the other batch had 3
    assert _metric(fresh, "quartet_generator_batch_sequences_sum") == 1 + 3 * 4
    assert _metric(fresh, "quartet_generator_sequences_total") == 13
    assert _metric(fresh, "quartet_generator_tokens_generated_total") > 0
    assert _metric(fresh, "quartet_generator_tokens_per_second") > 0
    for k, r in requests.items():  # batched with others, each got what it gets alone
        assert _rows(results[k])[0] == _rows(stub.Generate(r, timeout=30))[0]


def test_overfull_queue_gets_resource_exhausted(fresh, prompt_ids) -> None:
    stub, _ = _stubs(fresh)  # max_queue=3
    entered, release = _gate_backend(fresh)
    results: dict = {}
    threads = [_call_in_thread(stub, _request(prompt_ids[:1]), results, "running")]
    assert entered.wait(10)
    threads += [_call_in_thread(stub, _request(prompt_ids[:1]), results, k) for k in range(3)]
    _wait_for(lambda: _metric(fresh, "quartet_generator_queue_depth") == 3)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(_request(prompt_ids[:1]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in info.value.details()
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert all(isinstance(results[k], generator_pb2.GenerateResponse) for k in ("running", 0, 1, 2))


# ------------------------------------------------------------------------------------------ vLLM


@pytest.mark.gpu
def test_vllm_backend(tiny_checkpoint, tiny_checkpoint_other, prompt_ids) -> None:
    """The vLLM backend keeps the same contracts; runs only where vllm and a CUDA GPU exist."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("the vllm backend needs a CUDA GPU")
    srv = start_server("generator", model=ModelConfig(path=str(tiny_checkpoint), dtype="bfloat16", device="cuda"),
                       options={"backend": "vllm", "gpu_memory_utilization": 0.3, "enforce_eager": True,
                                "max_model_len": 128})
    try:
        stub = generator_pb2_grpc.GeneratorStub(open_channel(srv.address))
        info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=30)
        assert info.backend == "vllm" and info.vocab_size == 54 and info.extra["logprobs"] == "raw"
        request = _request(prompt_ids, n=4, max_new_tokens=6, seed=3)
        first, again = stub.Generate(request, timeout=120), stub.Generate(request, timeout=120)
        assert _rows(first)[0] == _rows(again)[0] and list(first.prompt_index) == [0] * 4 + [1] * 4 + [2] * 4
        model = _hf_model(tiny_checkpoint)
        ids, lps = _rows(first)
        for k, (row, lp) in enumerate(zip(ids, lps, strict=True)):  # bf16 engine vs fp32 reference
            assert torch.allclose(lp, _direct_logprobs(model, prompt_ids[first.prompt_index[k]], row), atol=0.05)

        other = _hf_model(tiny_checkpoint_other)
        resp = push_weights(open_channel(srv.address), other.state_dict().items(), 1, timeout=120,
                            dtype=torch.bfloat16)
        assert resp.version == 1
        after = stub.Generate(request, timeout=120)
        assert after.weight_version == 1
        ids, lps = _rows(after)
        for k, (row, lp) in enumerate(zip(ids, lps, strict=True)):
            assert torch.allclose(lp, _direct_logprobs(other, prompt_ids[after.prompt_index[k]], row), atol=0.05)
    finally:
        srv.stop(grace=0)


def test_runtime_info_metric_names_backend(server) -> None:
    labels = {"role": "generator", "backend": "transformers", "identity": server.role.identity}
    assert server.role.identity.startswith("generator/transformers:model@")
    assert _metric(server, "quartet_service_info", labels) == 1
