"""Generator service over real gRPC on 127.0.0.1, a server of its own per test: UpdateWeights (applied
atomically; bad or interrupted streams change nothing; the admin token required), batching of concurrent
callers and the bounded queue. Sampling, validation, health and GetInfo: test_generator.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from quartet.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.common.channel import open_channel
from services.common.server import RunningServer
from services.common.weights import iter_weight_chunks, push_weights
from tests.forward import direct_logprobs, hf_model
from tests.integration.generator_calls import ADMIN, CALL, generate_request, sample_rows, stubs
from tests.integration.serving import metric, serve_generator, wait_for


@pytest.fixture
def fresh(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    """A server of our own, for tests that change weights or block the worker."""
    with serve_generator(tiny_checkpoint, token=CALL, admin_token=ADMIN, max_queue=3) as srv:
        yield srv


# ------------------------------------------------------------------------------------------ weights


def test_update_weights_changes_logprobs_and_version(fresh, prompt_ids, tiny_checkpoint_other) -> None:
    stub, admin = stubs(fresh)
    request = generate_request(prompt_ids, n=2, max_new_tokens=6)
    before = stub.Generate(request, timeout=30)
    other = hf_model(tiny_checkpoint_other)

    resp = push_weights(admin, other.state_dict().items(), 1, timeout=30, chunk_bytes=64 << 10)

    assert (resp.version, resp.tensors_updated) == (1, 20)  # 21 state-dict entries, lm_head tied
    assert resp.bytes_received == sum(p.numel() * 4 for p in other.parameters())
    after = stub.Generate(request, timeout=30)
    assert after.weight_version == 1 and before.weight_version == 0
    ids, lps = sample_rows(after)
    assert not torch.equal(torch.cat(lps), torch.cat(sample_rows(before)[1]))
    for k, (row, lp) in enumerate(zip(ids, lps, strict=True)):  # it now serves exactly the other model
        want = direct_logprobs(other, prompt_ids[after.prompt_index[k]], row)
        assert torch.allclose(lp, want, atol=1e-4)
    assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10).weight_version == 1
    assert metric(fresh, "quartet_generator_weight_version") == 1
    assert metric(fresh, "quartet_generator_weight_update_bytes_total") == resp.bytes_received
    assert metric(fresh, "quartet_generator_weight_update_seconds_count") == 1


def test_call_token_cannot_update_weights(fresh, tiny_checkpoint_other) -> None:
    call_channel = open_channel(fresh.address, token=CALL)
    with pytest.raises(grpc.RpcError) as info:
        push_weights(call_channel, hf_model(tiny_checkpoint_other).state_dict().items(), 1, timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _perturbed(path: Path) -> dict[str, torch.Tensor]:
    model = hf_model(path)
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
    stub, admin = stubs(fresh)
    request = generate_request(prompt_ids, n=2, temperature=0.0)
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
    stub, admin = stubs(fresh)
    request = generate_request(prompt_ids, n=2, temperature=0.0)
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
        return sum(metric(fresh, "quartet_generator_weight_update_failures_total", {"reason": r})
                   for r in ("cancelled", "FailedPrecondition", "InvalidArgument"))

    wait_for(lambda: failures() == 1)
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
    stub, _ = stubs(fresh)
    entered, release = _gate_backend(fresh)
    results: dict = {}
    threads = [_call_in_thread(stub, generate_request(prompt_ids[:1], seed=0), results, "first")]
    assert entered.wait(10)  # the worker is busy with the first call
    requests = {k: generate_request(prompt_ids[:2], n=2, seed=k) for k in range(3)}
    threads += [_call_in_thread(stub, r, results, k) for k, r in requests.items()]
    wait_for(lambda: metric(fresh, "quartet_generator_queue_depth") == 3)
    release.set()
    for t in threads:
        t.join(60)

    assert metric(fresh, "quartet_generator_batch_requests_count") == 2
    assert metric(fresh, "quartet_generator_batch_requests_bucket", {"le": "2.0"}) == 1  # the other batch had 3
    assert metric(fresh, "quartet_generator_batch_sequences_sum") == 1 + 3 * 4
    assert metric(fresh, "quartet_generator_sequences_total") == 13
    assert metric(fresh, "quartet_generator_tokens_generated_total") > 0
    assert metric(fresh, "quartet_generator_tokens_per_second") > 0
    for k, r in requests.items():  # batched with others, each got what it gets alone
        assert sample_rows(results[k])[0] == sample_rows(stub.Generate(r, timeout=30))[0]


def test_overfull_queue_gets_resource_exhausted(fresh, prompt_ids) -> None:
    stub, _ = stubs(fresh)  # max_queue=3
    entered, release = _gate_backend(fresh)
    results: dict = {}
    threads = [_call_in_thread(stub, generate_request(prompt_ids[:1]), results, "running")]
    assert entered.wait(10)
    threads += [_call_in_thread(stub, generate_request(prompt_ids[:1]), results, k) for k in range(3)]
    wait_for(lambda: metric(fresh, "quartet_generator_queue_depth") == 3)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(generate_request(prompt_ids[:1]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in info.value.details()
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert all(isinstance(results[k], generator_pb2.GenerateResponse) for k in ("running", 0, 1, 2))
