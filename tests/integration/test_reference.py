"""Reference service over real gRPC on 127.0.0.1: LogProbs equals a direct transformers forward pass,
bad input gets the documented status naming the field, health, GetInfo, metrics, overload."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from quartet.v1 import common_pb2, reference_pb2, reference_pb2_grpc
from services.common import hf
from services.common.channel import health_status, open_channel
from services.common.codec import decode_ragged, encode_ragged, encode_tensor
from services.common.config import ServerConfig
from services.common.role import ModelConfig
from services.common.server import RunningServer, start_server
from services.reference.backend import ReferenceBackend
from tests.forward import hf_model
from tests.integration.serving import hold_load, metric

BUDGET = 24  # tokens per forward pass: small enough that the batch below needs several


def _model(path: Path) -> ModelConfig:
    return ModelConfig(path=str(path), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    srv = start_server(
        "reference", model=_model(tiny_checkpoint),
        options={"max_batch_tokens": BUDGET, "max_batch_sequences": 8, "max_concurrent": 2},
        server=ServerConfig(token="call-token", admin_token="admin-token"),
    )
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[reference_pb2_grpc.ReferenceStub]:
    channel = open_channel(server.address, token="call-token")
    yield reference_pb2_grpc.ReferenceStub(channel)
    channel.close()


def _request(rows: list[list[int]], starts: list[int], dtype: torch.dtype = torch.int64) -> reference_pb2.LogProbsRequest:
    batch = common_pb2.SequenceBatch(token_ids=encode_ragged([torch.tensor(r) for r in rows], dtype=dtype),
                                     response_start=starts)
    return reference_pb2.LogProbsRequest(sequences=batch)


def _ragged_batch(vocab: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(7)
    lengths = [5, 17, 2, 11, 23, 8, 14]
    starts = [2, 9, 2, 1, 20, 8, 3]  # row 5 has no response tokens (start == len)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths], starts


def test_logprobs_equal_direct_transformers(server, stub, tiny_checkpoint) -> None:
    model = hf_model(tiny_checkpoint)
    rows, starts = _ragged_batch(model.config.vocab_size)
    micro_before = metric(server, "quartet_reference_micro_batches_total")

    got = decode_ragged(stub.LogProbs(_request(rows, starts), timeout=30).logprobs, dtypes=(torch.float32,)).rows()

    assert metric(server, "quartet_reference_micro_batches_total") - micro_before >= 4  # budget forced splitting
    assert len(got) == len(rows)
    with torch.no_grad():
        for row, start, out in zip(rows, starts, got, strict=True):
            ids = torch.tensor(row)
            logits = model(input_ids=ids.unsqueeze(0)).logits[0].float()  # [L, V], one unpadded sequence
            want = torch.log_softmax(logits, -1)[start - 1 : len(row) - 1].gather(-1, ids[start:, None]).squeeze(-1)
            assert out.shape == (len(row) - start,)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_int32_ids_and_single_token_prompt(stub) -> None:
    a = decode_ragged(stub.LogProbs(_request([[3, 4, 5]], [1], dtype=torch.int32), timeout=10).logprobs).rows()
    b = decode_ragged(stub.LogProbs(_request([[3, 4, 5]], [1]), timeout=10).logprobs).rows()
    assert a[0].shape == (2,) and torch.equal(a[0], b[0]) and bool((a[0] < 0).all())


@pytest.mark.parametrize(
    ("rows", "starts", "code", "words"),
    [
        ([], [], grpc.StatusCode.INVALID_ARGUMENT, ["sequences.token_ids", "empty"]),
        ([[1, 2, 3]], [0], grpc.StatusCode.INVALID_ARGUMENT, ["sequences.response_start", "row 0"]),
        ([[1, 2, 3]], [4], grpc.StatusCode.INVALID_ARGUMENT, ["sequences.response_start", "[1, 3]"]),
        ([[1, 2], [3, 4]], [1], grpc.StatusCode.INVALID_ARGUMENT, ["sequences.response_start", "1 entries for 2"]),
        ([[1, 99999]], [1], grpc.StatusCode.OUT_OF_RANGE, ["sequences.token_ids", "99999", "vocab_size"]),
        ([[1, -3]], [1], grpc.StatusCode.OUT_OF_RANGE, ["sequences.token_ids", "-3"]),
        ([[1, 2]] * 9, [1] * 9, grpc.StatusCode.INVALID_ARGUMENT, ["max_batch_sequences=8"]),
        ([[1] * (BUDGET + 1)], [1], grpc.StatusCode.INVALID_ARGUMENT, ["sequences.token_ids", f"limit of {BUDGET}"]),
    ],
)
def test_bad_input_names_the_field(stub, rows, starts, code, words) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.LogProbs(_request(rows, starts), timeout=10)
    assert err.value.code() == code
    for w in words:
        assert w in err.value.details()
    assert len(decode_ragged(stub.LogProbs(_request([[1, 2, 3]], [1]), timeout=10).logprobs)) == 1  # still serves


def test_wrong_dtype_and_bad_offsets(stub) -> None:
    bad_dtype = _request([[1, 2, 3]], [1], dtype=torch.float32)
    bad_offsets = _request([[1, 2, 3]], [1])
    bad_offsets.sequences.token_ids.offsets[:] = [0, 5]
    no_values = reference_pb2.LogProbsRequest(sequences=common_pb2.SequenceBatch(
        token_ids=common_pb2.Ragged(values=encode_tensor(torch.zeros(0, dtype=torch.int64)), offsets=[0, 0]),
        response_start=[1]))
    for request, word in [(bad_dtype, "sequences.token_ids.values.dtype"), (bad_offsets, "sequences.token_ids.offsets"),
                          (no_values, "sequences.response_start")]:
        with pytest.raises(grpc.RpcError) as err:
            stub.LogProbs(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert word in err.value.details()


def test_overloaded_beyond_max_concurrent(server, stub) -> None:
    gate = server.role.impl.gate
    with gate.enter(), gate.enter():  # both slots (max_concurrent=2) taken
        with pytest.raises(grpc.RpcError) as err:
            stub.LogProbs(_request([[1, 2, 3]], [1]), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent=2" in err.value.details()
    stub.LogProbs(_request([[1, 2, 3]], [1]), timeout=10)


def test_get_info(stub, tiny_checkpoint) -> None:
    info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10)
    assert info.role == "reference" and info.backend == "transformers" and info.dtype == "float32"
    assert info.tokenizer_fingerprint == hf.tokenizer_fingerprint(hf.load_tokenizer(tiny_checkpoint))
    assert info.vocab_size == len(hf.load_tokenizer(tiny_checkpoint))
    assert info.limits.max_batch_sequences == 8 and info.limits.max_message_bytes > 0
    assert info.model_path == str(tiny_checkpoint)


def test_metrics_move(server, stub) -> None:
    names = ["quartet_reference_sequences_total", "quartet_reference_tokens_total",
             "quartet_reference_response_tokens_total", "quartet_reference_micro_batches_total"]
    before = [metric(server, n) for n in names]
    stub.LogProbs(_request([[1, 2, 3, 4], [5, 6]], [2, 1]), timeout=10)
    after = [metric(server, n) for n in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 6, 3, 1]


def test_health_not_serving_until_loaded(tiny_checkpoint, monkeypatch) -> None:
    release = hold_load(monkeypatch, ReferenceBackend)
    srv = start_server("reference", model=_model(tiny_checkpoint), wait_ready=False)
    channel = open_channel(srv.address)
    stub = reference_pb2_grpc.ReferenceStub(channel)
    try:
        assert health_status(channel) == "NOT_SERVING"
        assert health_status(channel, "quartet.v1.Reference") == "NOT_SERVING"
        for call in (lambda: stub.LogProbs(_request([[1, 2]], [1]), timeout=5),
                     lambda: stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        assert srv.wait_ready(timeout=30)
        assert health_status(channel, "quartet.v1.Reference") == "SERVING"
        assert len(decode_ragged(stub.LogProbs(_request([[1, 2]], [1]), timeout=10).logprobs)) == 1
    finally:
        release.set()
        srv.stop(grace=0)
        channel.close()
