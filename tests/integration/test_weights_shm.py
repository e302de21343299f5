"""Same-host weights over real gRPC on 127.0.0.1: a GeneratorClient picks shared memory by itself,
the generator serves exactly the sent model, a refusal or a local failure falls back to the stream
(logged once, counted), forced transports are obeyed, the admin token is required, and a bad handle
or checksum is refused with the field named while the served version stays."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from pydantic import ValidationError

from orchestrator.remote.clients import GeneratorClient, ServiceError
from orchestrator.run.services_config import Endpoint, GeneratorEndpoint
from quartet.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.common import shm_weights, weights
from services.common.channel import open_channel
from services.common.codec import decode_ragged, encode_ragged
from services.common.server import RunningServer
from services.common.weights import SharedWeightsWriter
from tests.forward import hf_model
from tests.integration.serving import metric, serve_generator

CALL, ADMIN = "shm-call-token", "shm-admin-token"
PROMPTS = [[5, 6, 7], [8, 9]]


@pytest.fixture
def fresh(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    with serve_generator(tiny_checkpoint, token=CALL, admin_token=ADMIN) as srv:
        yield srv


@pytest.fixture
def refusing(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    with serve_generator(tiny_checkpoint, token=CALL, admin_token=ADMIN, shared_memory_weights=False) as srv:
        yield srv


def _client(srv: RunningServer, transport: str | None = None) -> GeneratorClient:
    ep = GeneratorEndpoint(address=srv.address, token=CALL, admin_token=ADMIN, **(
        {"weights_transport": transport} if transport else {}))
    client = GeneratorClient(ep, deadline_s=30, weights_deadline_s=30)
    client.info()
    return client


def _state(path: Path) -> dict[str, torch.Tensor]:
    return hf_model(path).state_dict()


def _generate(srv: RunningServer) -> generator_pb2.GenerateResponse:
    stub = generator_pb2_grpc.GeneratorStub(open_channel(srv.address, token=CALL))
    req = generator_pb2.GenerateRequest(
        prompt_ids=encode_ragged([torch.tensor(p) for p in PROMPTS], dtype=torch.int64),
        params=generator_pb2.SamplingParams(n=2, temperature=1.0, max_new_tokens=5, seed=3))
    return stub.Generate(req, timeout=30)


def test_auto_sends_through_shared_memory_and_serves_exactly_those_weights(
        fresh, tiny_checkpoint, tiny_checkpoint_other) -> None:
    before_shm = set(os.listdir("/dev/shm"))
    client = _client(fresh)
    before = _generate(fresh)
    sync = client.update_weights(_state(tiny_checkpoint_other), 1)
    assert (sync.transport, sync.version, sync.tensors) == ("shm", 1, 20)  # lm_head tied to the embedding
    other = _generate(fresh)
    assert other.weight_version == 1 and other.logprobs != before.logprobs
    # Back to the first model by shared memory: sampling is seeded, so the answer is bit-identical.
    assert client.update_weights(_state(tiny_checkpoint), 2).transport == "shm"
    again = _generate(fresh)
    assert again.weight_version == 2
    assert (again.completion_ids, again.logprobs) == (before.completion_ids, before.logprobs)
    assert metric(fresh, "quartet_generator_weight_updates_total", {"transport": "shm"}) == 2
    assert client.weight_transport.fallbacks == 0
    client.close()
    assert set(os.listdir("/dev/shm")) == before_shm


def test_shared_memory_and_stream_apply_the_same_bytes(fresh, tiny_checkpoint_other) -> None:
    state = _state(tiny_checkpoint_other)
    _client(fresh, "shm").update_weights(state, 1)
    by_shm = _generate(fresh)
    _client(fresh, "grpc").update_weights(state, 2)
    by_stream = _generate(fresh)
    assert (by_shm.completion_ids, by_shm.logprobs) == (by_stream.completion_ids, by_stream.logprobs)
    assert metric(fresh, "quartet_generator_weight_updates_total", {"transport": "grpc"}) == 1


def test_a_refusing_generator_gets_the_stream_logged_once_and_counted(refusing, tiny_checkpoint_other, caplog) -> None:
    client = _client(refusing)
    state = _state(tiny_checkpoint_other)
    with caplog.at_level(logging.WARNING, logger="quartet.orchestrator.clients"):
        assert client.update_weights(state, 1).transport == "grpc"
        assert client.update_weights(state, 2).transport == "grpc"
    warnings = [r for r in caplog.records if "shared-memory weights" in r.getMessage()]
    assert len(warnings) == 1 and "shared_memory_weights" in warnings[0].getMessage()
    assert client.weight_transport.fallbacks == 1
    assert metric(refusing, "quartet_generator_weight_update_failures_total", {"reason": "shm_disabled"}) == 1
    assert _generate(refusing).weight_version == 2


def test_a_local_failure_falls_back_to_the_stream(fresh, tiny_checkpoint_other, monkeypatch) -> None:
    def no_memfd(*_a, **_k):
        raise OSError(38, "memfd_create not supported here")

    monkeypatch.setattr(weights.os, "memfd_create", no_memfd)
    client = _client(fresh)
    assert client.update_weights(_state(tiny_checkpoint_other), 1).transport == "grpc"
    assert client.weight_transport.fallbacks == 1 and "memfd_create" in client.weight_transport.refusal
    assert _generate(fresh).weight_version == 1


def test_a_bad_tensor_is_refused_without_giving_up_shared_memory(fresh, tiny_checkpoint_other) -> None:
    client = _client(fresh)
    state = _state(tiny_checkpoint_other)
    bad = {**state, "model.norm.weight": torch.full_like(state["model.norm.weight"], float("nan"))}
    with pytest.raises(ServiceError, match=r"INVALID_ARGUMENT: weights\[model.norm.weight\]"):
        client.update_weights(bad, 1)
    assert client.weight_transport.fallbacks == 0 and client.info().weight_version == 0
    assert client.update_weights(state, 1).transport == "shm"


def test_forced_shm_fails_instead_of_falling_back(refusing, tiny_checkpoint_other) -> None:
    client = _client(refusing, "shm")
    with pytest.raises(ServiceError, match="weights_transport is 'shm'"):
        client.update_weights(_state(tiny_checkpoint_other), 1)
    assert client.info().weight_version == 0


def test_forced_grpc_and_remote_addresses_never_touch_shared_memory(fresh, tiny_checkpoint_other) -> None:
    client = _client(fresh, "grpc")
    assert client.update_weights(_state(tiny_checkpoint_other), 1).transport == "grpc"
    assert client.weight_transport.writer.fd is None
    remote = GeneratorClient(Endpoint(address="10.255.0.1:50051"), deadline_s=1, weights_deadline_s=1)
    assert not remote.weight_transport.wants_shm()
    with pytest.raises(ValidationError, match="weights_transport"):
        GeneratorEndpoint(address="127.0.0.1:1", weights_transport="ipc")


def _push_raw(srv: RunningServer, msgs: list[generator_pb2.SharedWeights], token: str = ADMIN):
    stub = generator_pb2_grpc.GeneratorStub(open_channel(srv.address, token=token))
    return stub.UpdateWeightsShared(iter(msgs), timeout=30)


def test_call_token_cannot_update_weights_shared(fresh, tiny_checkpoint_other) -> None:
    writer = SharedWeightsWriter()
    with pytest.raises(grpc.RpcError) as info:
        _push_raw(fresh, list(writer.messages(_state(tiny_checkpoint_other).items(), 1)), token=CALL)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    writer.close()


@pytest.mark.parametrize(("field", "edit"), [
    ("segment.nonce", lambda m: setattr(m[0].segment, "nonce", b"\0" * 16)),
    ("segment.size", lambda m: setattr(m[0].segment, "size", 12)),
    ("segment.fd", lambda m: setattr(m[0].segment, "fd", 100_000)),
    ("crc32", lambda m: setattr(m[0].tensors[0], "crc32", m[0].tensors[0].crc32 ^ 0xFF)),
    ("shape", lambda m: m[0].tensors[1].shape.append(1)),
])
def test_bad_handles_and_checksums_change_nothing(fresh, tiny_checkpoint_other, field, edit) -> None:
    before = _generate(fresh)
    writer = SharedWeightsWriter()
    msgs = list(writer.messages(_state(tiny_checkpoint_other).items(), 1))
    edit(msgs)
    with pytest.raises(grpc.RpcError) as info:
        _push_raw(fresh, msgs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()
    after = _generate(fresh)
    assert after.weight_version == 0 and after == before
    assert metric(fresh, "quartet_generator_weight_update_failures_total", {"reason": "shm_InvalidArgument"}) == 1
    good = list(writer.messages(_state(tiny_checkpoint_other).items(), 1))
    assert _push_raw(fresh, good).version == 1  # the update lock and the segment lock were released
    info_stub = generator_pb2_grpc.GeneratorStub(open_channel(fresh.address, token=CALL))
    assert info_stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10).weight_version == 1
    writer.close()


def test_staged_views_are_read_only_copies_into_the_model(fresh, tiny_checkpoint_other) -> None:
    """After the swap the generator holds its own copy: rewriting the segment changes nothing served."""
    client = _client(fresh)
    state = _state(tiny_checkpoint_other)
    client.update_weights(state, 1)
    served = _generate(fresh)
    writer = client.weight_transport.writer
    writer._bytes[shm_weights.HEADER_BYTES:] = 0  # scribble over every tensor in the segment
    assert _generate(fresh) == served
    ids = decode_ragged(served.completion_ids, dtypes=(torch.int64,))
    assert ids.values.numel() > 0


def test_update_weights_shared_retried_after_it_landed_is_a_success(fresh, tiny_checkpoint_other) -> None:
    from tests.integration.test_retries import FAST, _LossyRelay

    method = "/quartet.v1.Generator/UpdateWeightsShared"
    relay = _LossyRelay(fresh.address, {method: 0}, streaming=frozenset({method}))
    client = GeneratorClient(GeneratorEndpoint(address=relay.address, token=CALL, admin_token=ADMIN), deadline_s=30,
                             weights_deadline_s=30, retry=FAST)
    try:
        client.info()
        state = _state(tiny_checkpoint_other)
        assert client.update_weights(state, 1).transport == "shm"  # probe + update
        relay.drop[method] = 1  # the next update lands, its answer is lost, the re-send finds it served
        sync = client.update_weights({k: v + 0.1 for k, v in state.items() if k != "lm_head.weight"}, 2)
        assert (sync.transport, sync.version, relay.calls[method]) == ("shm", 2, 4)
        assert client.weight_transport.fallbacks == 0
        with pytest.raises(ServiceError, match=r"UpdateWeightsShared: FAILED_PRECONDITION: .*already serves version 2"):
            client.update_weights(state, 2)  # a first attempt refused as stale is an error, not a success
    finally:
        client.close()
        relay.close()
