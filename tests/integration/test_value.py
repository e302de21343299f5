"""Value service over real gRPC on 127.0.0.1: training lowers the loss, step ids are idempotent,
Save / restart / Load restores the critic exactly, names cannot escape the checkpoint directory, bad
input names the field, health, GetInfo, metrics."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from quartet.v1 import common_pb2, value_pb2, value_pb2_grpc
from services.common import hf
from services.common.channel import health_status, open_channel
from services.common.codec import decode_ragged, encode_ragged
from services.common.config import ServerConfig
from services.common.role import ModelConfig
from services.common.server import RunningServer, start_server
from services.value.backend import ValueBackend
from tests.integration.serving import hold_load, metric

CALL, ADMIN = "call-token", "admin-token"
OPTIONS = {"lr": 3e-3, "max_batch_tokens": 32, "max_batch_sequences": 8}


@dataclass
class Client:
    server: RunningServer
    stub: value_pb2_grpc.ValueStub  # admin token
    call_stub: value_pb2_grpc.ValueStub  # call token
    channels: tuple[grpc.Channel, ...]

    def close(self) -> None:
        for c in self.channels:
            c.close()
        self.server.stop(grace=0)


def _start(checkpoint: Path, checkpoint_dir: Path | None, **kw) -> Client:
    srv = start_server(
        "value", model=ModelConfig(path=str(checkpoint), dtype="float32", device="cpu"),
        options=OPTIONS, server=ServerConfig(token=CALL, admin_token=ADMIN),
        checkpoint_dir=checkpoint_dir, **kw,
    )
    admin, call = open_channel(srv.address, token=ADMIN), open_channel(srv.address, token=CALL)
    return Client(srv, value_pb2_grpc.ValueStub(admin), value_pb2_grpc.ValueStub(call), (admin, call))


@pytest.fixture
def client(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[Client]:
    c = _start(tiny_checkpoint, tmp_path / "ckpts")
    yield c
    c.close()


# A fixed batch: 5 sequences of different lengths, returns drawn once.
_G = torch.Generator().manual_seed(3)
LENGTHS, STARTS = [6, 13, 4, 19, 9], [2, 7, 4, 1, 5]
ROWS = [torch.randint(0, 50, (n,), generator=_G).tolist() for n in LENGTHS]
RETURNS = [torch.randn(n - s, generator=_G) for n, s in zip(LENGTHS, STARTS, strict=True)]


def _batch(rows=ROWS, starts=STARTS) -> common_pb2.SequenceBatch:
    return common_pb2.SequenceBatch(token_ids=encode_ragged([torch.tensor(r) for r in rows], dtype=torch.int64),
                                    response_start=starts)


def _train(step_id: int, returns=RETURNS, old_values=None, clip: float | None = None, **kw) -> value_pb2.TrainStepRequest:
    request = value_pb2.TrainStepRequest(sequences=kw.pop("sequences", _batch()), step_id=step_id,
                                         returns=encode_ragged(returns, dtype=torch.float32), **kw)
    if old_values is not None:
        request.old_values.CopyFrom(encode_ragged(old_values, dtype=torch.float32))
    if clip is not None:
        request.clip_range = clip
    return request


def _values(stub: value_pb2_grpc.ValueStub) -> tuple[list[torch.Tensor], int]:
    response = stub.Values(value_pb2.ValuesRequest(sequences=_batch()), timeout=30)
    return [r.clone() for r in decode_ragged(response.values, dtypes=(torch.float32,)).rows()], response.steps_trained


def test_values_shape_and_fresh_head_is_zero(client) -> None:
    values, steps = _values(client.call_stub)  # the call token may read values
    assert [v.numel() for v in values] == [n - s for n, s in zip(LENGTHS, STARTS, strict=True)]
    assert steps == 0 and all(bool((v == 0).all()) for v in values)  # zero-initialised head


def test_twenty_steps_lower_the_loss(client) -> None:
    old = _values(client.stub)[0]
    responses = [client.stub.TrainStep(_train(i, old_values=old, clip=100.0), timeout=60) for i in range(20)]
    losses = [r.loss for r in responses]
    assert losses[-1] < 0.25 * losses[0], losses
    assert responses[-1].explained_variance > 0.5 > responses[0].explained_variance
    assert all(r.grad_norm > 0 and not r.duplicate for r in responses)
    assert responses[-1].steps_trained == 20 and responses[-1].last_step_id == 19
    info = client.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10)
    assert info.weight_version == 20 and info.last_step_id == 19
    srv = client.server
    assert metric(srv, "quartet_value_train_steps_total") == 20
    assert metric(srv, "quartet_value_loss") == pytest.approx(losses[-1])
    assert metric(srv, "quartet_value_explained_variance") == pytest.approx(responses[-1].explained_variance)


def test_clip_fraction_and_minibatches(client) -> None:
    old = [torch.zeros_like(r) for r in RETURNS]
    client.stub.TrainStep(_train(0, old_values=old, clip=100.0), timeout=60)
    # Values moved away from old_values = 0: with a tiny clip most tokens take the clipped branch.
    r = client.stub.TrainStep(_train(1, returns=[-x for x in RETURNS], old_values=old, clip=1e-4,
                                     epochs=2, minibatch_size=2), timeout=60)
    assert 0 < r.clip_fraction <= 1 and r.steps_trained == 2
    assert metric(client.server, "quartet_value_optimizer_steps_total") == 1 + 2 * 3  # 2 epochs x ceil(5 / 2)


def test_repeated_step_id_does_not_train(client) -> None:
    first = client.stub.TrainStep(_train(5), timeout=60)
    assert not first.duplicate and first.last_step_id == 5
    before, _ = _values(client.stub)
    for step_id in (5, 3, 0):  # the same id again, and older ones
        again = client.stub.TrainStep(_train(step_id, returns=[x + 10 for x in RETURNS]), timeout=60)
        assert again.duplicate and again.steps_trained == 1 and again.last_step_id == 5
    after, steps = _values(client.stub)
    assert steps == 1 and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert metric(client.server, "quartet_value_duplicate_steps_total") == 3
    assert not client.stub.TrainStep(_train(6), timeout=60).duplicate


def test_save_restart_load_gives_identical_values(tiny_checkpoint, tmp_path) -> None:
    ckpts = tmp_path / "ckpts"
    first = _start(tiny_checkpoint, ckpts)
    try:
        for i in range(3):
            first.stub.TrainStep(_train(i), timeout=60)
        saved = first.stub.Save(value_pb2.SaveRequest(name="run-1/step-3"), timeout=60)
        assert saved.steps_trained == 3 and saved.last_step_id == 2
        assert Path(saved.path) == (ckpts / "run-1" / "step-3").resolve()
        at_save, _ = _values(first.stub)
        first.stub.TrainStep(_train(3), timeout=60)  # one more step, to compare the optimizer state after Load
        continued, _ = _values(first.stub)
    finally:
        first.close()

    second = _start(tiny_checkpoint, ckpts)  # a new server (fresh critic) on the same checkpoint directory
    try:
        assert _values(second.stub)[1] == 0
        loaded = second.stub.Load(value_pb2.LoadRequest(name="run-1/step-3"), timeout=60)
        assert loaded.steps_trained == 3 and loaded.last_step_id == 2
        values, steps = _values(second.stub)
        assert steps == 3 and all(torch.equal(a, b) for a, b in zip(values, at_save, strict=True))
        assert second.stub.TrainStep(_train(2), timeout=60).duplicate  # the restored counter is honoured
        second.stub.TrainStep(_train(3), timeout=60)
        after, _ = _values(second.stub)
        assert all(torch.equal(a, b) for a, b in zip(after, continued, strict=True))  # AdamW state came back too
        info = second.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10)
        assert info.weight_version == 4 and info.last_step_id == 3
    finally:
        second.close()


def test_save_overwrites_only_checkpoints(client, tmp_path) -> None:
    client.stub.Save(value_pb2.SaveRequest(name="latest"), timeout=60)
    client.stub.TrainStep(_train(0), timeout=60)
    assert client.stub.Save(value_pb2.SaveRequest(name="latest"), timeout=60).steps_trained == 1
    (tmp_path / "ckpts" / "other").mkdir()
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Save(value_pb2.SaveRequest(name="other"), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["latest", "other"]  # no temporary directories left


def test_names_escaping_the_checkpoint_dir_are_denied(client, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "ckpts").mkdir(exist_ok=True)
    os.symlink(outside, tmp_path / "ckpts" / "link")
    for name in ["../x", "/abs/x", str(outside / "x"), "a/../../x", "link/x", "link", "~/x"]:
        for call in (lambda n: client.stub.Save(value_pb2.SaveRequest(name=n), timeout=30),
                     lambda n: client.stub.Load(value_pb2.LoadRequest(name=n), timeout=30)):
            with pytest.raises(grpc.RpcError) as err:
                call(name)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (name, err.value.details())
    assert list(outside.iterdir()) == []
    for name, code in [("", grpc.StatusCode.INVALID_ARGUMENT), (".", grpc.StatusCode.INVALID_ARGUMENT),
                       ("missing", grpc.StatusCode.INVALID_ARGUMENT)]:
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Load(value_pb2.LoadRequest(name=name), timeout=30)
        assert err.value.code() == code and "name" in err.value.details()


def test_admin_methods_need_the_admin_token(client) -> None:
    for call in (lambda s: s.TrainStep(_train(0), timeout=30),
                 lambda s: s.Save(value_pb2.SaveRequest(name="x"), timeout=30),
                 lambda s: s.Load(value_pb2.LoadRequest(name="x"), timeout=30)):
        with pytest.raises(grpc.RpcError) as err:
            call(client.call_stub)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _values(client.stub)[1] == 0


def _nan_row(i: int) -> list[torch.Tensor]:
    rows = [r.clone() for r in RETURNS]
    rows[i][0] = float("nan")
    return rows


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda: _train(0, returns=_nan_row(1)), "INVALID_ARGUMENT", ["returns", "row 1", "NaN"]),
        (lambda: _train(0, old_values=[r.clone().fill_(float("inf")) for r in RETURNS], clip=0.2),
         "INVALID_ARGUMENT", ["old_values", "NaN or infinite"]),
        (lambda: _train(0, returns=[*RETURNS[:-1], torch.zeros(7)]), "INVALID_ARGUMENT", ["returns", "row 4", "4 response tokens"]),
        (lambda: _train(0, returns=RETURNS[:3]), "INVALID_ARGUMENT", ["returns.offsets", "expected 5"]),
        (lambda: _train(0, clip=0.2), "INVALID_ARGUMENT", ["old_values", "required"]),
        (lambda: _train(0, old_values=RETURNS, clip=-1.0), "INVALID_ARGUMENT", ["clip_range"]),
        (lambda: _train(-1), "INVALID_ARGUMENT", ["step_id"]),
        (lambda: _train(0, epochs=1000), "INVALID_ARGUMENT", ["epochs", "max_epochs=32"]),
        (lambda: _train(0, minibatch_size=-2), "INVALID_ARGUMENT", ["minibatch_size"]),
        (lambda: value_pb2.TrainStepRequest(sequences=_batch(), step_id=0), "INVALID_ARGUMENT", ["returns", "required"]),
        (lambda: _train(0, sequences=_batch([[1, 2, 3]], [0]), returns=[torch.zeros(3)]),
         "INVALID_ARGUMENT", ["sequences.response_start"]),
        (lambda: _train(0, sequences=_batch([[1, 500]], [1]), returns=[torch.zeros(1)]),
         "OUT_OF_RANGE", ["sequences.token_ids", "500"]),
        (lambda: _train(0, sequences=common_pb2.SequenceBatch()), "INVALID_ARGUMENT", ["sequences.token_ids", "empty"]),
    ],
)
def test_bad_train_input_names_the_field_and_trains_nothing(client, make, code, words) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.TrainStep(make(), timeout=30)
    assert err.value.code().name == code
    for w in words:
        assert w in err.value.details(), err.value.details()
    values, steps = _values(client.stub)
    assert steps == 0 and all(bool((v == 0).all()) for v in values)  # untouched critic
    assert not client.stub.TrainStep(_train(0), timeout=60).duplicate  # and step 0 is still free


def test_mask_limits_training_to_marked_tokens(client) -> None:
    mask = [torch.zeros_like(r) for r in RETURNS]
    request = _train(0, mask=encode_ragged(mask, dtype=torch.float32))
    response = client.stub.TrainStep(request, timeout=60)
    assert response.loss == 0 and response.grad_norm == 0  # nothing to train on: no optimizer step
    bad = _train(1, mask=encode_ragged([r.fill_(0.5) for r in mask], dtype=torch.float32))
    with pytest.raises(grpc.RpcError) as err:
        client.stub.TrainStep(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mask" in err.value.details()


def test_get_info_and_value_metrics(client, tiny_checkpoint) -> None:
    info = client.call_stub.GetInfo(common_pb2.GetInfoRequest(), timeout=10)
    assert info.role == "value" and info.weight_version == 0 and info.last_step_id == -1
    assert info.tokenizer_fingerprint == hf.tokenizer_fingerprint(hf.load_tokenizer(tiny_checkpoint))
    assert info.limits.max_batch_sequences == 8
    _values(client.call_stub)
    assert metric(client.server, "quartet_value_sequences_total") == 5
    assert metric(client.server, "quartet_value_tokens_total") == sum(n - s for n, s in zip(LENGTHS, STARTS, strict=True))


def test_health_not_serving_until_loaded(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    release = hold_load(monkeypatch, ValueBackend)
    client = _start(tiny_checkpoint, tmp_path, wait_ready=False)
    try:
        assert health_status(client.channels[0], "quartet.v1.Value") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as err:
            client.stub.TrainStep(_train(0), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        assert client.server.wait_ready(timeout=30)
        assert health_status(client.channels[0], "quartet.v1.Value") == "SERVING"
        assert _values(client.stub)[1] == 0
    finally:
        release.set()
        client.close()
