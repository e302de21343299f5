"""The weight stream, both ends, without gRPC: packing, the pre-serialized frames, and every way the
assembler refuses a stream (each naming the tensor), plus buffer reuse."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quartet.v1 import generator_pb2 as pb
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.weight_assembler import _Coverage
from services.common.weight_wire import decode_chunk
from services.common.weights import (
    WeightAssembler,
    iter_weight_chunks,
    iter_weight_frames,
    model_weight_specs,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(54, 16, generator=g)
    return {
        "embed.weight": emb,
        "layer.w": torch.randn(16, 40, generator=g),
        "layer.bias": torch.randn(40, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "steps": torch.tensor(7, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "head.weight": emb,  # tied to embed.weight: same storage
    }


def _assembler(state: dict[str, torch.Tensor]) -> WeightAssembler:
    specs, aliases = model_weight_specs(state)
    return WeightAssembler(specs, aliases=aliases)


def test_specs_treat_tied_tensors_as_one() -> None:
    specs, aliases = model_weight_specs(_state())
    assert aliases == {"head.weight": "embed.weight"}
    assert "head.weight" not in specs and specs["embed.weight"].shape == (54, 16)
    assert specs["layer.bias"].dtype == torch.bfloat16 and specs["steps"].shape == ()


@pytest.mark.parametrize("chunk_bytes", [7, 100, 4096, 1 << 20])
def test_roundtrip_and_frames_equal_messages(chunk_bytes: int) -> None:
    state = _state()
    chunks = list(iter_weight_chunks(state.items(), version=3, chunk_bytes=chunk_bytes))
    frames = list(iter_weight_frames(state.items(), version=3, chunk_bytes=chunk_bytes))
    assert [pb.WeightChunk.FromString(f) for f in frames] == chunks  # the hand-made wire bytes are protobuf

    staged = _assembler(state).assemble(iter(chunks), current_version=2)

    assert staged.version == 3 and staged.chunks == len(chunks)
    assert set(staged.tensors) == set(state) - {"head.weight"}
    for name, t in staged.tensors.items():
        assert t.dtype == state[name].dtype and torch.equal(t, state[name]), name


def test_packing_buckets_small_tensors_and_splits_big_ones() -> None:
    state = _state()
    total = sum(t.numel() * t.element_size() for n, t in state.items() if n != "head.weight")
    chunks = list(iter_weight_chunks(state.items(), version=1, chunk_bytes=1000))
    sizes = [sum(len(p.data) for p in c.pieces) for c in chunks]

    assert sizes[:-1] == [1000] * (len(chunks) - 1) and 0 < sizes[-1] <= 1000  # full chunks, never one per tensor
    assert len(chunks) == -(-total // 1000)
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert (chunks[0].total_tensors, chunks[0].total_bytes) == (6, total)
    assert all(c.total_bytes == 0 for c in chunks[1:])
    assert all(c.version == 1 for c in chunks)
    embed = [p for c in chunks for p in c.pieces if p.name == "embed.weight"]  # 3456 bytes -> split
    assert len(embed) >= 4 and [p.offset for p in embed] == sorted(p.offset for p in embed)
    assert all(p.crc32 == zlib.crc32(p.data) for c in chunks for p in c.pieces)
    last = chunks[-1]
    assert len({p.name for p in last.pieces}) > 1  # small tensors share a chunk


def test_dtype_cast_on_send() -> None:
    state = {"w": torch.randn(4, 4), "i": torch.arange(3)}
    chunk = next(iter_weight_chunks(state.items(), version=1, dtype=torch.bfloat16))
    asm = WeightAssembler({"w": ((4, 4), torch.bfloat16), "i": ((3,), torch.int64)})
    staged = asm.assemble([chunk], current_version=0)
    assert torch.equal(staged.tensors["w"], state["w"].to(torch.bfloat16))
    assert torch.equal(staged.tensors["i"], state["i"])  # integer tensors are never cast


def test_buffers_are_reused_between_updates() -> None:
    state = _state()
    asm = _assembler(state)
    first = asm.assemble(iter_weight_chunks(state.items(), version=1, chunk_bytes=64), current_version=0)
    ptr = first.tensors["layer.w"].data_ptr()
    state2 = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    state2["head.weight"] = state2["embed.weight"]  # keep them tied
    second = asm.assemble(iter_weight_chunks(state2.items(), version=2, chunk_bytes=64), current_version=1)
    assert second.tensors["layer.w"].data_ptr() == ptr
    assert torch.equal(second.tensors["layer.w"], state2["layer.w"])


def _chunks(state: dict[str, torch.Tensor], chunk_bytes: int = 256, version: int = 1) -> list[pb.WeightChunk]:
    return list(iter_weight_chunks(state.items(), version=version, chunk_bytes=chunk_bytes))


def _piece(chunks: list[pb.WeightChunk], name: str) -> pb.WeightPiece:
    return next(p for c in chunks for p in c.pieces if p.name == name)


def _refuse(state: dict[str, torch.Tensor], chunks, current: int = 0) -> Exception:
    with pytest.raises((InvalidArgument, FailedPrecondition)) as info:
        _assembler(state).assemble(iter(chunks), current_version=current)
    return info.value


def test_unknown_name_wrong_shape_wrong_dtype() -> None:
    state = _state()
    extra = dict(state, **{"ghost.weight": torch.ones(2)})
    err = _refuse(state, _chunks(extra))
    assert isinstance(err, InvalidArgument) and "weights[ghost.weight]" in str(err) and "unknown" in str(err)

    err = _refuse(state, _chunks(dict(state, **{"layer.w": torch.randn(40, 16)})))
    assert "weights[layer.w].shape" in str(err) and "[40, 16]" in str(err)

    err = _refuse(state, _chunks(dict(state, **{"layer.bias": torch.randn(40)})))
    assert "weights[layer.bias].dtype" in str(err) and "bfloat16" in str(err)


def test_bad_checksum_names_tensor() -> None:
    state = _state()
    chunks = _chunks(state)
    _piece(chunks, "layer.w").crc32 ^= 1
    err = _refuse(state, chunks)
    assert "weights[layer.w].crc32" in str(err) and "checksum" in str(err)


def test_corrupted_bytes_caught_by_checksum() -> None:
    state = _state()
    chunks = _chunks(state)
    piece = _piece(chunks, "embed.weight")
    piece.data = bytes([piece.data[0] ^ 0xFF]) + piece.data[1:]
    assert "weights[embed.weight].crc32" in str(_refuse(state, chunks))


def test_offsets_out_of_bounds() -> None:
    state = _state()
    chunks = _chunks(state)
    _piece(chunks, "layer.w").offset = 16 * 40 * 4 - 1
    assert "weights[layer.w].offset" in str(_refuse(state, chunks))
    chunks = _chunks(state)
    _piece(chunks, "layer.w").offset = -4
    assert "outside" in str(_refuse(state, chunks))


def test_overlap_and_missing_bytes() -> None:
    state = _state()
    chunks = _chunks(state, chunk_bytes=128)
    dup = [p for c in chunks for p in c.pieces if p.name == "embed.weight"][1]
    chunks[-1].pieces.append(dup)  # the same bytes twice
    err = _refuse(state, chunks)
    assert "weights[embed.weight].offset" in str(err) and "overlap" in str(err)

    chunks = _chunks(state, chunk_bytes=128)
    c = next(c for c in chunks if any(p.name == "embed.weight" and p.offset > 0 for p in c.pieces))
    keep = [p for p in c.pieces if not (p.name == "embed.weight" and p.offset > 0)]
    del c.pieces[:]
    c.pieces.extend(keep)  # a hole inside embed.weight
    err = _refuse(state, chunks)
    assert "incomplete" in str(err) and "embed.weight" in str(err)


def test_missing_tensor_and_announced_totals() -> None:
    state = _state()
    err = _refuse(state, _chunks({k: v for k, v in state.items() if k != "layer.bias"}))
    assert "missing layer.bias (0/80 bytes)" in str(err)

    chunks = _chunks(state)
    chunks[0].total_bytes += 4
    assert "total_bytes" in str(_refuse(state, chunks))


def test_tied_alias_sent_twice_is_refused_but_alias_alone_works() -> None:
    state = _state()
    untied = dict(state, **{"head.weight": state["embed.weight"].clone()})  # both names, separate storage
    err = _refuse(state, _chunks(untied))
    assert "weights[head.weight]" in str(err) and "tied to embed.weight" in str(err)

    only_alias = {("head.weight" if k == "embed.weight" else k): v for k, v in state.items() if k != "head.weight"}
    staged = _assembler(state).assemble(iter(_chunks(only_alias)), current_version=0)
    assert torch.equal(staged.tensors["embed.weight"], state["embed.weight"])


def test_versions() -> None:
    state = _state()
    err = _refuse(state, _chunks(state, version=5), current=5)
    assert isinstance(err, FailedPrecondition) and "already serves version 5" in str(err)

    chunks = _chunks(state)
    chunks[-1].version = 2
    err = _refuse(state, chunks)
    assert isinstance(err, InvalidArgument) and "version" in str(err)


def test_stream_without_last_and_inactive_client() -> None:
    state = _state()
    chunks = _chunks(state)[:-1]
    err = _refuse(state, chunks)
    assert "last" in str(err) and "incomplete" in str(err)

    with pytest.raises(FailedPrecondition, match="cancelled"):
        _assembler(state).assemble(iter(_chunks(state)), current_version=0, is_active=lambda: False)


def test_coverage_out_of_order_and_overlaps() -> None:
    cov = _Coverage()
    assert cov.add(10, 20) and cov.add(0, 5) and cov.add(30, 40) and cov.add(5, 10)
    assert not cov.add(15, 25) and not cov.add(39, 41) and not cov.add(0, 1)
    assert cov.add(20, 30) and cov.covered() == 40 and cov.add(40, 40)


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=6),
    chunk_bytes=st.integers(1, 300),
    frames=st.booleans(),
)
def test_any_shapes_any_chunk_size_roundtrip(shapes: list[list[int]], chunk_bytes: int, frames: bool) -> None:
    g = torch.Generator().manual_seed(1)
    state = {f"t{i}": torch.randn(*s, generator=g) if s else torch.randn((), generator=g) for i, s in enumerate(shapes)}
    if frames:
        chunks = [pb.WeightChunk.FromString(f)
                  for f in iter_weight_frames(state.items(), version=9, chunk_bytes=chunk_bytes)]
    else:
        chunks = list(iter_weight_chunks(state.items(), version=9, chunk_bytes=chunk_bytes))
    staged = _assembler(state).assemble(iter(chunks), current_version=0)
    for name, t in state.items():
        assert torch.equal(staged.tensors[name], t)


def _as_dict(chunk) -> dict:
    return {"version": chunk.version, "last": chunk.last, "total_tensors": chunk.total_tensors,
            "total_bytes": chunk.total_bytes,
            "pieces": [(p.name, p.dtype, list(p.shape), p.offset, bytes(p.data), p.crc32) for p in chunk.pieces]}


def test_zero_copy_decoder_reads_what_protobuf_writes() -> None:
    state = _state()
    for chunk in iter_weight_chunks(state.items(), version=2**40, chunk_bytes=100):
        view = decode_chunk(chunk.SerializeToString())
        assert view.error is None and _as_dict(view) == _as_dict(chunk)
        assert all(isinstance(p.data, memoryview) for p in view.pieces if p.data)
    odd = pb.WeightChunk(version=1, total_tensors=-3, pieces=[pb.WeightPiece(name="é", shape=[2, -1], offset=-4)])
    assert _as_dict(decode_chunk(odd.SerializeToString())) == _as_dict(odd)  # negative int64s, unicode names
    # unknown fields (a newer sender) are skipped; unpacked repeated shape is read too
    extra = odd.SerializeToString() + bytes([0x78, 0x05]) + bytes([0x12, 0x04, 0x18, 0x03, 0x18, 0x04])
    view = decode_chunk(extra)
    assert view.error is None and view.pieces[-1].shape == [3, 4]


def test_zero_copy_decoder_reports_malformed_bytes() -> None:
    good = next(iter_weight_chunks(_state().items(), version=1)).SerializeToString()
    for bad in (good[:60], b"\x12\xff\xff\xff\xff\x0f", b"\x0b", b"\x08\x80"):
        view = decode_chunk(bad)
        assert view.error is not None and "malformed WeightChunk" in view.error
    with pytest.raises(InvalidArgument, match="chunk 0: malformed"):
        _assembler(_state()).assemble([decode_chunk(good[:60])], current_version=0)


def test_assembler_takes_decoded_views() -> None:
    state = _state()
    frames = iter_weight_frames(state.items(), version=4, chunk_bytes=333)
    staged = _assembler(state).assemble((decode_chunk(f) for f in frames), current_version=0)
    assert all(torch.equal(t, state[n]) for n, t in staged.tensors.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(dtype: torch.dtype, bad: float) -> None:
    state = {"ok": torch.randn(5).to(dtype), "w": torch.randn(3, 7).to(dtype), "i": torch.arange(4)}
    asm = WeightAssembler({n: (tuple(t.shape), t.dtype) for n, t in state.items()})
    asm.assemble(iter_weight_chunks(state.items(), version=1), current_version=0)  # finite: accepted
    state["w"][2, 6] = bad
    with pytest.raises(InvalidArgument, match=r"weights\[w\]: contains NaN or infinite"):
        asm.assemble(iter_weight_chunks(state.items(), version=2), current_version=1)
