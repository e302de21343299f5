"""Client retries over real gRPC on 127.0.0.1: a restarted service is reached again, a dead one gives
up within the budget naming service / call / status, RESOURCE_EXHAUSTED is retried and
INVALID_ARGUMENT is not, a TrainStep or UpdateWeights whose first attempt landed (its answer lost on
the way back, by a relay) is acknowledged, not applied twice."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

from orchestrator.remote.clients import GeneratorClient, RewardClient, ServiceError, ValueClient
from orchestrator.remote.retry import RetryPolicy
from orchestrator.run.config import Endpoint
from quartet.v1 import reward_pb2, reward_pb2_grpc
from services.common import hf
from services.common.codec import decode_ragged, encode_tensor
from services.common.config import ServerConfig
from services.common.role import ModelConfig
from services.common.server import RunningServer, start_server

CALL, ADMIN = "call-SECRET-token", "admin-SECRET-token"
FAST = RetryPolicy(max_attempts=1000, initial_backoff_s=0.02, max_backoff_s=0.2, budget_s=20.0)
RULE = {"kind": "rule", "rule": "arithmetic"}
MSG = 64 << 20


def _reward_server(port: int = 0) -> RunningServer:
    return start_server("reward", options=RULE, server=ServerConfig(port=port, token=CALL, metrics_port=None))


def _score(client: RewardClient):
    return client.score([[1, 2]], [[3]], ["1+1="], ["2"], [{"answer": "2"}])


def _reward_client(address: str, policy: RetryPolicy) -> RewardClient:
    return RewardClient(Endpoint(address=address, token=CALL), deadline_s=5, retry=policy)


def test_score_succeeds_after_the_service_restarts_on_its_port() -> None:
    srv = _reward_server()
    port, client = srv.port, _reward_client(srv.address, FAST)
    restarted: list[RunningServer] = []
    try:
        assert float(_score(client).rewards[0]) == 1.0
        srv.stop(grace=0)
        timer = threading.Timer(0.7, lambda: restarted.append(_reward_server(port)))
        timer.start()
        start = time.monotonic()
        scores = _score(client)  # UNAVAILABLE until the restart, then served
        assert time.monotonic() - start >= 0.5
        timer.join()
        assert float(scores.rewards[0]) == 1.0 and restarted[0].port == port
    finally:
        client.close()
        for s in restarted:
            s.stop(grace=0)


def test_a_service_that_stays_down_fails_within_the_budget() -> None:
    srv = _reward_server()
    address = srv.address
    srv.stop(grace=0)
    policy = RetryPolicy(max_attempts=1000, initial_backoff_s=0.02, max_backoff_s=0.1, budget_s=1.0)
    client = _reward_client(address, policy)
    start = time.monotonic()
    with pytest.raises(ServiceError) as e:
        _score(client)
    elapsed = time.monotonic() - start
    client.close()
    assert 0.5 < elapsed < 2.5
    msg = str(e.value)
    assert f"reward at {address} service, Score: UNAVAILABLE" in msg and "services.retry.budget_s=1" in msg
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "SECRET" not in msg


class _ScriptedReward(reward_pb2_grpc.RewardServicer):
    """Fails the next calls with the scripted statuses, then scores every sample 1.0."""

    def __init__(self, script: list[grpc.StatusCode]) -> None:
        self.script, self.calls = list(script), 0

    def Score(self, request, context):  # gRPC method name
        self.calls += 1
        if self.script:
            context.abort(self.script.pop(0), "scripted failure")
        n = len(decode_ragged(request.completion_ids, field="completion_ids"))
        return reward_pb2.ScoreResponse(rewards=encode_tensor(torch.ones(n)), identity="scripted")


@pytest.fixture
def scripted() -> Iterator[tuple[_ScriptedReward, str]]:
    servicer = _ScriptedReward([])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    reward_pb2_grpc.add_RewardServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=0)


def test_resource_exhausted_is_retried_and_logged_without_tokens(scripted, caplog: pytest.LogCaptureFixture) -> None:
    servicer, address = scripted
    servicer.script = [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED]
    client = _reward_client(address, FAST)
    with caplog.at_level(logging.WARNING, logger="quartet.orchestrator.retry"):
        assert float(_score(client).rewards[0]) == 1.0
    client.close()
    assert servicer.calls == 3
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 2 and all(f"reward at {address} service, Score" in m for m in retries)
    assert "RESOURCE_EXHAUSTED (attempt 1 of 1000)" in retries[0] and "(attempt 2 of 1000)" in retries[1]
    assert "SECRET" not in caplog.text


def test_invalid_argument_is_not_retried(scripted) -> None:
    servicer, address = scripted
    servicer.script = [grpc.StatusCode.INVALID_ARGUMENT]
    client = _reward_client(address, FAST)
    with pytest.raises(ServiceError, match=r"Score: INVALID_ARGUMENT: scripted failure") as e:
        _score(client)
    client.close()
    assert servicer.calls == 1 and e.value.code == grpc.StatusCode.INVALID_ARGUMENT


class _LossyRelay:
    """A loopback relay that forwards raw bytes (and the authorization header) to `target`, and for
    each method in `drop` loses the answer of its first N calls after they landed (UNAVAILABLE)."""

    def __init__(self, target: str, drop: dict[str, int], streaming: frozenset[str] = frozenset()) -> None:
        self.drop, self.streaming = dict(drop), streaming
        self.calls: dict[str, int] = {}
        opts = [("grpc.max_send_message_length", MSG), ("grpc.max_receive_message_length", MSG)]
        self.channel = grpc.insecure_channel(target, options=opts)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=opts)
        self.server.add_generic_rpc_handlers([self])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def service(self, details: grpc.HandlerCallDetails):
        method = details.method
        if method in self.streaming:
            return grpc.stream_unary_rpc_method_handler(lambda it, ctx: self._forward(method, it, ctx, stream=True))
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._forward(method, req, ctx, stream=False))

    def _forward(self, method: str, request, ctx: grpc.ServicerContext, *, stream: bool):
        self.calls[method] = self.calls.get(method, 0) + 1
        md = [(k, v) for k, v in ctx.invocation_metadata() if k == "authorization"]
        rpc = self.channel.stream_unary(method) if stream else self.channel.unary_unary(method)
        try:
            answer = rpc(request, metadata=md, timeout=60)
        except grpc.RpcError as e:
            ctx.abort(e.code(), e.details())
        if self.drop.get(method, 0) > 0:
            self.drop[method] -= 1
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "relay lost the answer")
        return answer

    def close(self) -> None:
        self.server.stop(grace=0)
        self.channel.close()


def test_train_step_retried_after_it_landed_is_a_duplicate(tiny_checkpoint: Path, tmp_path: Path) -> None:
    srv = start_server("value", model=ModelConfig(path=str(tiny_checkpoint), dtype="float32", device="cpu"),
                       options={"lr": 3e-3}, server=ServerConfig(token=CALL, admin_token=ADMIN, metrics_port=None),
                       checkpoint_dir=tmp_path / "ckpts")
    train = "/quartet.v1.Value/TrainStep"
    relay = _LossyRelay(srv.address, {train: 1})
    client = ValueClient(Endpoint(address=relay.address, token=CALL, admin_token=ADMIN), deadline_s=30,
                         train_deadline_s=30, checkpoint_deadline_s=30, retry=FAST)
    try:
        prompts, completions = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
        r = client.train_step(prompts, completions, returns=[torch.ones(2), torch.zeros(3)],
                              old_values=[torch.zeros(2), torch.zeros(3)], mask=None, clip_range=None, step_id=1)
        assert relay.calls[train] == 2  # the first landed, its answer was lost, the retry was acknowledged
        assert r.duplicate and r.steps_trained == 1 and r.last_step_id == 1
        assert client.info().last_step_id == 1
    finally:
        client.close()
        relay.close()
        srv.stop(grace=0)


def test_update_weights_retried_after_it_landed_is_a_success(tiny_checkpoint: Path) -> None:
    srv = start_server("generator", model=ModelConfig(path=str(tiny_checkpoint), dtype="float32", device="cpu"),
                       server=ServerConfig(token=CALL, admin_token=ADMIN, metrics_port=None))
    update = "/quartet.v1.Generator/UpdateWeights"
    relay = _LossyRelay(srv.address, {update: 1}, streaming=frozenset({update}))
    client = GeneratorClient(Endpoint(address=relay.address, token=CALL, admin_token=ADMIN), deadline_s=30,
                             weights_deadline_s=30, weights_transport="grpc", retry=FAST)  # the stream the relay counts
    try:
        model = hf.load_causal_lm(tiny_checkpoint, dtype=torch.float32, device=torch.device("cpu"))
        state = {k: v.detach() + 0.1 for k, v in model.named_parameters()}  # tied weights once
        sync = client.update_weights(state, 1)
        assert relay.calls[update] == 2 and sync.version == 1 and sync.tensors == len(state)
        assert client.info().weight_version == 1
        with pytest.raises(ServiceError, match=r"UpdateWeights: FAILED_PRECONDITION: .*already serves version 1"):
            client.update_weights(state, 1)  # a first attempt refused as stale is an error, not a success
    finally:
        client.close()
        relay.close()
        srv.stop(grace=0)
