"""Generator service over real gRPC on 127.0.0.1: sampling (n per prompt, seeds, raw logprobs equal to a
direct forward pass, stop tokens and strings), validation, health, GetInfo, the runtime info metric and
the vLLM backend. UpdateWeights and the batching of concurrent callers: test_generator_weights_batching.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from quartet.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.common import hf
from services.common.channel import health_status, open_channel
from services.common.codec import encode_ragged
from services.common.role import ModelConfig
from services.common.server import RunningServer, start_server
from services.common.weights import push_weights
from services.generator.transformers_backend import TransformersBackend
from tests.forward import direct_logprobs, hf_model
from tests.integration.generator_calls import ADMIN, CALL, generate_request, sample_rows, stubs
from tests.integration.serving import hold_load, metric, serve_generator


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    with serve_generator(tiny_checkpoint, token=CALL, admin_token=ADMIN) as srv:
        yield srv


# ------------------------------------------------------------------------------------------ sampling


def test_n_samples_per_prompt_prompt_major(server, prompt_ids) -> None:
    stub, _ = stubs(server)
    resp = stub.Generate(generate_request(prompt_ids, n=4, max_new_tokens=5), timeout=30)
    ids, lps = sample_rows(resp)
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
    stub, _ = stubs(server)
    first = sample_rows(stub.Generate(generate_request(prompt_ids, n=3, seed=5), timeout=30))[0]
    again = sample_rows(stub.Generate(generate_request(prompt_ids, n=3, seed=5), timeout=30))[0]
    other = sample_rows(stub.Generate(generate_request(prompt_ids, n=3, seed=6), timeout=30))[0]
    assert first == again and first != other
    # sample j of prompt i does not depend on n, on the other prompts, or on other requests in the batch
    # (the seed is per (prompt index in the request, sample index))
    fewer = sample_rows(stub.Generate(generate_request(prompt_ids[:2], n=2, seed=5), timeout=30))[0]
    assert fewer == first[0:2] + first[3:5]
    backend = server.role.backend
    from services.generator.backend import GenerationRequest, SamplingParams

    mine = GenerationRequest(prompt_ids, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=5))
    noise = GenerationRequest([[1, 9, 9, 9, 9, 9, 9, 9, 9]], SamplingParams(n=5, temperature=0.5, top_k=4,
                                                                            max_new_tokens=3, seed=99))
    batched = backend.generate_many([noise, mine, noise])[1]
    assert [s.token_ids for s in batched] == first


def test_logprobs_equal_direct_forward(server, prompt_ids, tiny_checkpoint) -> None:
    stub, _ = stubs(server)
    model = hf_model(tiny_checkpoint)
    # sampling with temperature / top-k / top-p must not change which distribution logprobs come from
    for params in ({"temperature": 1.0}, {"temperature": 0.6, "top_k": 5, "top_p": 0.9}, {"temperature": 0.0}):
        resp = stub.Generate(generate_request(prompt_ids, n=2, max_new_tokens=8, **params), timeout=30)
        ids, lps = sample_rows(resp)
        for k, (row, lp) in enumerate(zip(ids, lps, strict=True)):
            want = direct_logprobs(model, prompt_ids[resp.prompt_index[k]], row)
            assert torch.allclose(lp, want, atol=1e-4), (params, k, (lp - want).abs().max())
            if params["temperature"] == 0.0:  # greedy picks the argmax of the same forward pass
                full = torch.tensor([prompt_ids[resp.prompt_index[k]] + row])
                with torch.no_grad():
                    logits = model(input_ids=full).logits[0]
                P = len(prompt_ids[resp.prompt_index[k]])
                assert logits[P - 1:-1].argmax(-1).tolist() == row


def test_stop_tokens_end_samples(server, prompt_ids) -> None:
    stub, _ = stubs(server)
    resp = stub.Generate(generate_request(prompt_ids, n=2, max_new_tokens=6, stop_token_ids=list(range(54))), timeout=30)
    ids, _ = sample_rows(resp)
    assert all(len(r) == 1 for r in ids)  # every token is a stop token: one token each, kept
    assert set(resp.finish_reasons) == {generator_pb2.FINISH_REASON_STOP}


def test_stop_strings_end_samples_at_the_token_completing_them(server, prompt_ids, tokenizer) -> None:
    """The same seeded samples with and without a stop string: with it, each is the same tokens up to the
    one completing the string's first occurrence (the char tokenizer: one character per token), STOP."""
    stub, _ = stubs(server)
    base = generate_request(prompt_ids[:1], n=4, max_new_tokens=12, seed=5)
    base.return_text = True
    free = stub.Generate(base, timeout=30)
    ids, lps = sample_rows(free)
    texts = list(free.completion_text)
    longest = max(range(4), key=lambda k: len(texts[k]))
    stop = texts[longest][2:4]
    assert len(stop) == 2, texts
    base.params.stop.append(stop)
    cut = stub.Generate(base, timeout=30)
    cut_ids, cut_lps = sample_rows(cut)
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
    stub, _ = stubs(server)
    resp = stub.Generate(generator_pb2.GenerateRequest(
        prompt_ids=generate_request(prompt_ids).prompt_ids, return_text=True,
        params=generator_pb2.SamplingParams(n=1, temperature=1.0, max_new_tokens=4, seed=1)), timeout=30)
    ids, _ = sample_rows(resp)
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
    stub, _ = stubs(server)
    req = generate_request(prompt_ids)
    mutate(req)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(req, timeout=30)
    assert info.value.code() == code and info.value.details().startswith(field), info.value.details()
    assert stub.Generate(generate_request(prompt_ids), timeout=30).weight_version == 0  # still serving


def test_get_info(server, tiny_checkpoint) -> None:
    stub, _ = stubs(server)
    info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10)
    assert info.tokenizer_fingerprint == hf.tokenizer_fingerprint(hf.load_tokenizer(tiny_checkpoint))
    assert (info.role, info.backend, info.dtype, info.device, info.vocab_size) == (
        "generator", "transformers", "float32", "cpu", 54)
    assert info.extra["logprobs"] == "raw" and info.weight_version == 0
    assert info.limits.max_new_tokens == 1024 and info.limits.max_samples_per_prompt == 64
    assert info.limits.max_queue == 64 and info.limits.max_tokens_per_call == 16384


def test_health_not_serving_until_loaded(tiny_checkpoint, monkeypatch) -> None:
    gate = hold_load(monkeypatch, TransformersBackend)
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
        request = generate_request(prompt_ids, n=4, max_new_tokens=6, seed=3)
        first, again = stub.Generate(request, timeout=120), stub.Generate(request, timeout=120)
        assert sample_rows(first)[0] == sample_rows(again)[0] and list(first.prompt_index) == [0] * 4 + [1] * 4 + [2] * 4
        model = hf_model(tiny_checkpoint)
        ids, lps = sample_rows(first)
        for k, (row, lp) in enumerate(zip(ids, lps, strict=True)):  # bf16 engine vs fp32 reference
            assert torch.allclose(lp, direct_logprobs(model, prompt_ids[first.prompt_index[k]], row), atol=0.05)

        other = hf_model(tiny_checkpoint_other)
        resp = push_weights(open_channel(srv.address), other.state_dict().items(), 1, timeout=120,
                            dtype=torch.bfloat16)
        assert resp.version == 1
        after = stub.Generate(request, timeout=120)
        assert after.weight_version == 1
        ids, lps = sample_rows(after)
        for k, (row, lp) in enumerate(zip(ids, lps, strict=True)):
            assert torch.allclose(lp, direct_logprobs(other, prompt_ids[after.prompt_index[k]], row), atol=0.05)
    finally:
        srv.stop(grace=0)


def test_runtime_info_metric_names_backend(server) -> None:
    labels = {"role": "generator", "backend": "transformers", "identity": server.role.identity}
    assert server.role.identity.startswith("generator/transformers:model@")
    assert metric(server, "quartet_service_info", labels) == 1
