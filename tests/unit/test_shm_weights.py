"""Same-host weights (services/common/shm_weights.py) without gRPC: the writer's memfd segment, the
receiver's in-place validation (every bad field named, nothing staged), the write/read lock, cleanup."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from quartet.v1 import generator_pb2 as pb
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.shm_weights import HEADER_BYTES, SharedWeightsReceiver, is_local_address
from services.common.weights import SharedWeightsWriter, model_weight_specs


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 8, generator=g)
    return {"embed.weight": emb, "layer.weight": torch.randn(300, 700, generator=g),
            "layer.bias": torch.randn(7, generator=g).to(torch.bfloat16), "count": torch.tensor([3], dtype=torch.int64),
            "head.weight": emb}  # tied to embed.weight: sent once


@pytest.fixture
def pair():
    state = _state()
    specs, aliases = model_weight_specs(state)
    writer, receiver = SharedWeightsWriter(), SharedWeightsReceiver(specs, aliases)
    yield state, writer, receiver
    receiver.close()
    writer.close()


def _msgs(writer: SharedWeightsWriter, state, version: int, **kw) -> list[pb.SharedWeights]:
    return list(writer.messages(state.items(), version, message_bytes=kw.pop("message_bytes", 1 << 10), **kw))


def _receive(receiver, msgs, current: int = 0):
    update = receiver.receive(msgs, current_version=current, lock_timeout_s=0.2)
    update.release()
    return update.staged


def test_round_trip_in_place_tied_and_mapping_kept(pair) -> None:
    state, writer, receiver = pair
    msgs = _msgs(writer, state, 1)
    assert len(msgs) > 1 and msgs[-1].last and msgs[0].total_tensors == 4
    staged = _receive(receiver, msgs)
    assert staged.version == 1 and set(staged.tensors) == {"embed.weight", "layer.weight", "layer.bias", "count"}
    for name, t in staged.tensors.items():
        assert t.dtype == state[name].dtype and torch.equal(t, state[name])
    mapped = receiver._seg
    state["layer.weight"].mul_(2)
    staged = _receive(receiver, _msgs(writer, state, 2), current=1)
    assert receiver._seg is mapped  # the same segment stays mapped: no page faults per update
    assert torch.equal(staged.tensors["layer.weight"], state["layer.weight"])
    assert writer.generation == 2


def test_segment_is_a_private_memfd_and_leaves_nothing_in_dev_shm(pair) -> None:
    state, writer, _ = pair
    before = set(os.listdir("/dev/shm"))
    _msgs(writer, state, 1)
    assert stat.S_IMODE(os.fstat(writer.fd).st_mode) == 0o600
    assert os.readlink(f"/proc/self/fd/{writer.fd}").startswith("/memfd:quartet-weights")
    assert set(os.listdir("/dev/shm")) == before


def test_sender_killed_leaves_nothing_behind() -> None:
    before = set(os.listdir("/dev/shm"))
    code = ("import os, torch; from services.common.weights import SharedWeightsWriter as W; w = W(); "
            "list(w.messages([('x', torch.ones(1 << 20))], 1)); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd(), capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert set(os.listdir("/dev/shm")) == before


@pytest.mark.parametrize(("edit", "field"), [
    (lambda m: setattr(m[0].tensors[0], "crc32", m[0].tensors[0].crc32 ^ 1), "weights[embed.weight].crc32"),
    (lambda m: m[0].tensors[0].shape.__setitem__(0, 41), "weights[embed.weight].shape"),
    (lambda m: setattr(m[0].tensors[0], "nbytes", 4), "weights[embed.weight].nbytes"),
    (lambda m: setattr(m[0].tensors[0], "offset", 8), "weights[embed.weight].offset"),
    (lambda m: setattr(m[0].tensors[0], "offset", 1 << 40), "weights[embed.weight].offset"),
    (lambda m: setattr(m[0].tensors[0], "name", "nope"), "weights[nope]"),
    (lambda m: m[-1].tensors.append(m[0].tensors[0]), "weights[embed.weight]"),
    (lambda m: m[-1].ClearField("tensors"), "weights"),
    (lambda m: setattr(m[0], "total_bytes", 5), "total_bytes"),
    (lambda m: setattr(m[-1], "version", 9), "version"),
    (lambda m: setattr(m[0].segment, "nonce", b"x" * 16), "segment.nonce"),
    (lambda m: setattr(m[0].segment, "size", m[0].segment.size + 1), "segment.size"),
    (lambda m: setattr(m[0].segment, "boot_id", "another-host"), "segment.boot_id"),
    (lambda m: setattr(m[0].segment, "fd", 999_999), "segment.fd"),
    (lambda m: setattr(m[0].segment, "pid", 0), "segment.pid"),
    (lambda m: m[0].ClearField("segment"), "segment"),
    (lambda m: m.pop(), "last"),
])
def test_bad_streams_name_the_field(pair, edit, field) -> None:
    state, writer, receiver = pair
    msgs = _msgs(writer, state, 1)
    edit(msgs)
    with pytest.raises(InvalidArgument) as err:
        _receive(receiver, msgs)
    assert err.value.field == field


def test_a_descriptor_that_is_not_a_weight_segment_is_refused(pair, tmp_path) -> None:
    state, writer, receiver = pair
    msgs = _msgs(writer, state, 1)
    with open(tmp_path / "f", "wb") as f:
        msgs[0].segment.fd = f.fileno()
        with pytest.raises(InvalidArgument, match="not a quartet-weights memfd") as err:
            _receive(receiver, msgs)
    assert err.value.field == "segment.fd"


def test_non_finite_values_and_stale_versions_are_refused(pair) -> None:
    state, writer, receiver = pair
    state["layer.weight"][3, 5] = float("nan")
    with pytest.raises(InvalidArgument, match="NaN") as err:
        _receive(receiver, _msgs(writer, state, 1))
    assert err.value.field == "weights[layer.weight]"
    state["layer.weight"][3, 5] = 0.0
    with pytest.raises(FailedPrecondition, match="already serves version 4"):
        _receive(receiver, _msgs(writer, state, 4), current=4)


def test_a_rewritten_segment_is_stale_and_reads_block_writes(pair) -> None:
    state, writer, receiver = pair
    old = _msgs(writer, state, 1)
    _msgs(writer, state, 1)  # a newer update bumped the generation
    with pytest.raises(FailedPrecondition, match="generation"):
        _receive(receiver, old)
    update = receiver.receive(_msgs(writer, state, 2), current_version=0)
    with pytest.raises(TimeoutError):  # the generator still reads: the writer waits
        writer.begin(timeout_s=0.05)
    update.release()
    writer.begin(timeout_s=0.05)


def test_probe_opens_without_staging(pair) -> None:
    _, writer, receiver = pair
    writer.ensure(1 << 12)
    update = receiver.receive([pb.SharedWeights(segment=writer.segment(), last=True, probe=True)], current_version=3)
    assert update.staged is None and receiver._seg is not None
    with pytest.raises(InvalidArgument) as err:
        receiver.receive([pb.SharedWeights(segment=writer.segment(), probe=True)], current_version=3)
    assert err.value.field == "probe"


def test_header_is_left_alone_by_tensors(pair) -> None:
    state, writer, _ = pair
    assert min(t.offset for m in _msgs(writer, state, 1) for t in m.tensors) == HEADER_BYTES


@pytest.mark.parametrize(("address", "local"), [
    ("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:5", True), ("dns:///localhost:7", True),
    ("unix:/tmp/g.sock", True), (f"{os.uname().nodename}:9", True), ("10.1.2.3:50051", False),
    ("generator.svc:50051", False), ("[2001:db8::1]:1", False),
])
def test_local_addresses(address: str, local: bool) -> None:
    assert is_local_address(address) is local
