"""The generator service with options.backend=vllm over real gRPC on 127.0.0.1: GetInfo, Generate
with logprobs equal to the trainer's fp32 forward, UpdateWeights then Generate on the new weights,
and a restart (the engine's processes end with the server; a new server serves the checkpoint again)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")  # a vLLM dependency

from vllm.platforms import current_platform  # noqa: E402

from quartet.v1 import common_pb2, generator_pb2, generator_pb2_grpc  # noqa: E402
from services.common import hf  # noqa: E402
from services.common.channel import open_channel  # noqa: E402
from services.common.codec import decode_ragged, encode_ragged  # noqa: E402
from services.common.config import ServerConfig  # noqa: E402
from services.common.role import ModelConfig  # noqa: E402
from services.common.server import RunningServer, start_server  # noqa: E402
from services.common.weights import push_weights  # noqa: E402
from tests.forward import direct_logprobs, hf_model  # noqa: E402
from tests.vllm.conftest import logprob_atol  # noqa: E402

pytestmark = pytest.mark.vllm

CALL, ADMIN = "vllm-call-token", "vllm-admin-token"
DEVICE = current_platform.device_type
ATOL = logprob_atol(DEVICE)
PROMPTS = ["12+34=", "7*8=", "1"]


def _start(path: Path) -> RunningServer:
    return start_server("generator", model=ModelConfig(path=str(path), dtype="float32", device=DEVICE),
                        options={"backend": "vllm", "torch_threads": 1},
                        server=ServerConfig(token=CALL, admin_token=ADMIN))


def _engine_processes() -> list[psutil.Process]:
    """This process's descendants but multiprocessing's resource tracker (it lives as long as this
    process): vLLM's engine core and worker, the only children these tests start."""
    return [p for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def prompt_ids(vllm_checkpoint: Path) -> list[list[int]]:
    tok = hf.load_tokenizer(vllm_checkpoint)
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def servers(vllm_checkpoint: Path) -> Iterator[list[RunningServer]]:
    """The module's server, last of the list: the restart test stops it and appends its successor
    (one engine start fewer: each takes 15-30 s on 2 busy cores)."""
    running = [_start(vllm_checkpoint)]
    yield running
    running[-1].stop(grace=0)


@pytest.fixture
def server(servers: list[RunningServer]) -> RunningServer:
    return servers[-1]


def _stub(srv: RunningServer) -> generator_pb2_grpc.GeneratorStub:
    return generator_pb2_grpc.GeneratorStub(open_channel(srv.address, token=CALL))


def _request(prompts: list[list[int]], **params) -> generator_pb2.GenerateRequest:
    params = {"n": 4, "temperature": 1.0, "max_new_tokens": 8, "seed": 7, **params}
    return generator_pb2.GenerateRequest(prompt_ids=encode_ragged([torch.tensor(p) for p in prompts], dtype=torch.int64),
                                         params=generator_pb2.SamplingParams(**params), return_text=True)


def _rows(resp: generator_pb2.GenerateResponse) -> tuple[list[list[int]], list[torch.Tensor]]:
    ids = [r.tolist() for r in decode_ragged(resp.completion_ids, dtypes=(torch.int64,)).rows()]
    return ids, decode_ragged(resp.logprobs, dtypes=(torch.float32,)).rows()


def _max_gap(model, prompts: list[list[int]], resp: generator_pb2.GenerateResponse) -> float:  # type: ignore[no-untyped-def]
    ids, lps = _rows(resp)
    return max(float((direct_logprobs(model, prompts[resp.prompt_index[k]], row) - lp).abs().max())
               for k, (row, lp) in enumerate(zip(ids, lps, strict=True)))


def test_getinfo_and_generate_with_the_trainers_logprobs(server, prompt_ids, vllm_checkpoint) -> None:
    stub = _stub(server)
    info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=30)
    assert (info.backend, info.device, info.dtype, info.vocab_size) == ("vllm", DEVICE, "float32", 54)
    assert info.extra["logprobs"] == "raw" and info.weight_version == 0
    assert info.identity.startswith("generator/vllm:")
    resp = stub.Generate(_request(prompt_ids), timeout=120)
    ids, lps = _rows(resp)
    assert list(resp.prompt_index) == [0] * 4 + [1] * 4 + [2] * 4
    assert resp.weight_version == 0 and resp.logprob_mode == "raw" and len(resp.completion_text) == 12
    assert all(1 <= len(row) == len(lp) <= 8 for row, lp in zip(ids, lps, strict=True))
    assert _max_gap(hf_model(vllm_checkpoint), prompt_ids, resp) < ATOL
    assert _rows(stub.Generate(_request(prompt_ids), timeout=120))[0] == ids  # same seed, same tokens


def test_update_weights_then_generate_serves_them(server, prompt_ids, vllm_checkpoint, vllm_checkpoint_other) -> None:
    stub = _stub(server)
    other = hf_model(vllm_checkpoint_other)
    admin = open_channel(server.address, token=ADMIN)
    t0 = time.perf_counter()
    resp = push_weights(admin, other.state_dict().items(), 1, timeout=120)
    seconds = time.perf_counter() - t0
    assert resp.version == 1 and resp.tensors_updated == len(server.role.backend.expected_weights())
    assert seconds < 30, f"UpdateWeights of a {resp.bytes_received} byte model took {seconds:.1f} s"
    after = stub.Generate(_request(prompt_ids), timeout=120)
    assert after.weight_version == 1
    assert _max_gap(other, prompt_ids, after) < ATOL
    assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=30).weight_version == 1
    back = push_weights(admin, hf_model(vllm_checkpoint).state_dict().items(), 2, timeout=120)
    assert back.version == 2
    assert _max_gap(hf_model(vllm_checkpoint), prompt_ids, stub.Generate(_request(prompt_ids), timeout=120)) < ATOL


def test_restart_ends_the_engine_and_a_new_server_serves_again(servers, prompt_ids, vllm_checkpoint) -> None:
    """Runs last: stops the module's server (at weight version 2), checks that vLLM's processes end with
    it, and starts a new one on the checkpoint."""
    old = servers[-1]
    engine = _engine_processes()
    assert engine, "the vllm backend started no engine process"
    first = _stub(old).Generate(_request(prompt_ids, n=2), timeout=120)  # version 2 = the checkpoint's weights
    assert first.weight_version == 2
    old.stop(grace=0)
    _, alive = psutil.wait_procs(engine, timeout=30)
    assert not alive, f"engine processes still running after stop: {[p.pid for p in alive]}"
    servers.append(_start(vllm_checkpoint))
    again = _stub(servers[-1]).Generate(_request(prompt_ids, n=2), timeout=120)
    assert again.weight_version == 0
    assert _rows(again)[0] == _rows(first)[0]  # the same weights and seed: the same samples after a restart
    assert _max_gap(hf_model(vllm_checkpoint), prompt_ids, again) < ATOL
