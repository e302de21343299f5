"""A stalled UpdateWeights stream fails fast and leaves the generator as it was.

The client sends the first chunks of a weight set, then neither sends more nor half-closes. Its
deadline ends the call with DEADLINE_EXCEEDED; gRPC cancels the server side, whose request
iterator then raises, so the generator drops the staged chunks, releases its update lock and keeps
serving the old version: the next good UpdateWeights is accepted at once (a held lock would make it
wait `update_wait_seconds` and fail with RESOURCE_EXHAUSTED) and Generate answers with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from quartet.v1 import generator_pb2, generator_pb2_grpc
from services.common.channel import open_channel
from services.common.codec import encode_ragged
from services.common.config import ServerConfig
from services.common.role import ModelConfig
from services.common.server import RunningServer, start_server
from services.common.weights import iter_weight_frames, push_weights

CALL, ADMIN = "stall-call-token", "stall-admin-token"
DEADLINE_S = 1.5
# The good call right after the stalled one waits at most this long for the update lock: a lock the
# stalled stream still holds fails it with RESOURCE_EXHAUSTED instead of being waited out.
UPDATE_WAIT_S = 1.0


@pytest.fixture
def server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    srv = start_server("generator", model=ModelConfig(path=str(tiny_checkpoint), dtype="float32", device="cpu"),
                       options={"update_wait_seconds": UPDATE_WAIT_S},
                       server=ServerConfig(token=CALL, admin_token=ADMIN, metrics_port=None))
    yield srv
    srv.stop(grace=0)


def _generate(srv: RunningServer) -> generator_pb2.GenerateResponse:
    stub = generator_pb2_grpc.GeneratorStub(open_channel(srv.address, token=CALL))
    req = generator_pb2.GenerateRequest(
        prompt_ids=encode_ragged([torch.tensor([5, 6, 7])], dtype=torch.int64),
        params=generator_pb2.SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=3))
    return stub.Generate(req, timeout=30)


def _failures(srv: RunningServer) -> dict[str, float]:
    """quartet_generator_weight_update_failures_total by reason."""
    return {s.labels["reason"]: s.value for metric in srv.registry.collect()
            if metric.name == "quartet_generator_weight_update_failures"
            for s in metric.samples if s.name.endswith("_total") and s.value}


def test_stalled_stream_ends_at_its_deadline_and_changes_nothing(server: RunningServer, tiny_checkpoint: Path) -> None:
    weights = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    frames = list(iter_weight_frames(weights.items(), version=1, chunk_bytes=16 * 1024))
    assert len(frames) >= 4, "the tiny model must span several chunks for a stream to stall mid-way"
    release = threading.Event()
    sent: list[int] = []

    def stalling() -> Iterator[bytes]:
        for frame in frames[:2]:
            sent.append(len(frame))
            yield frame
        release.wait(60)  # no more chunks and no half-close: the stream just stops

    admin = open_channel(server.address, token=ADMIN)
    call = admin.stream_unary("/quartet.v1.Generator/UpdateWeights", request_serializer=lambda b: b,
                              response_deserializer=generator_pb2.UpdateWeightsResponse.FromString)
    before = _generate(server)
    start = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as err:
            call(stalling(), timeout=DEADLINE_S)
        waited = time.monotonic() - start
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(sent) == 2
        assert waited < DEADLINE_S + 1.0, f"the stalled call took {waited:.1f} s for a {DEADLINE_S} s deadline"

        # The old weights still serve: same version, and the same seeded samples as before the stall.
        after = _generate(server)
        assert after.weight_version == 0
        assert after.completion_ids == before.completion_ids and after.logprobs == before.logprobs
        # No waiting for the server: the lock must already be free (or freed within UPDATE_WAIT_S),
        # since gRPC cancelled the server side at the same deadline.
        t0 = time.monotonic()
        resp = push_weights(admin, weights.items(), 1, timeout=30)
        assert resp.version == 1, resp
        print(f"good UpdateWeights accepted {time.monotonic() - t0:.2f} s after the stalled call's deadline")
        # The stalled stream was dropped as interrupted, not applied. gRPC ends the server's request
        # iterator with an RpcError or quietly, and a quiet end may come just before is_active()
        # turns False (the stream then looks like one without its last chunk): whichever of these
        # races it runs into, the generator counts it as cancelled.
        assert _failures(server) == {"cancelled": 1}
        changed = _generate(server)
        assert changed.weight_version == 1 and changed.completion_ids == before.completion_ids  # same weights, v1
    finally:
        release.set()
        admin.close()


class _Context:
    """The two things _call_alive reads of a grpc.ServicerContext, on a fake clock-driven deadline."""

    def __init__(self, deadline_in_s: float | None, *, active: bool = True) -> None:
        self.deadline = None if deadline_in_s is None else time.monotonic() + deadline_in_s
        self.active = active

    def is_active(self) -> bool:
        return self.active

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@pytest.mark.parametrize(("deadline_in_s", "alive"), [(0.05, False), (None, True), (30.0, True)])
def test_a_short_stream_waits_out_a_near_deadline(deadline_in_s: float | None, alive: bool) -> None:
    """The race the stall test used to lose now and then: the iterator ended quietly just before the
    deadline. With settling, a deadline nearer than the settle time is waited out (cancelled); a
    client that half-closed early with time to spare is still alive (a malformed stream)."""
    from services.generator.servicer import _call_alive

    t0 = time.monotonic()
    assert _call_alive(_Context(deadline_in_s), settle_s=0.2) is alive
    assert time.monotonic() - t0 < 0.5
    assert _call_alive(_Context(30.0, active=False), settle_s=0.2) is False
    assert _call_alive(_Context(0.05)) is True  # no settling: the answer of this instant
