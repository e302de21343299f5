"""Tensor codec: round trips for every wire dtype and odd shapes, and every malformed message rejected.

Round trips go through real protobuf serialization (SerializeToString / ParseFromString), so they
test what crosses the wire, and compare raw bytes, so NaN payloads and -0.0 must survive too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quartet.v1 import common_pb2 as pb
from services.common.codec import (
    RaggedTensor,
    decode_array,
    decode_ragged,
    decode_tensor,
    encode_ragged,
    encode_tensor,
    tensor_bytes,
    torch_dtype,
    wire_dtype,
)
from services.common.errors import InvalidArgument

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool, torch.uint8,
          torch.float64]
NUMPY_DTYPES = [np.float32, np.float16, np.int32, np.int64, np.bool_, np.uint8, np.float64]
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)  # () is a 0-d scalar


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@st.composite
def tensors(draw: st.DrawFn, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Any shape and bit pattern of any wire dtype (bools restricted to 0/1, the only valid bool bytes)."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    numel = math.prod(shape)
    raw = draw(st.binary(min_size=numel * _itemsize(dtype), max_size=numel * _itemsize(dtype)))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def _wire(msg):  # type: ignore[no-untyped-def]
    """The message as the receiver sees it."""
    out = type(msg)()
    out.ParseFromString(msg.SerializeToString())
    return out


@settings(max_examples=300, deadline=None)
@given(tensors())
def test_tensor_round_trip_every_dtype_and_shape(x: torch.Tensor) -> None:
    msg = _wire(encode_tensor(x))
    assert list(msg.shape) == list(x.shape)
    assert len(msg.data) == x.numel() * x.element_size()
    y = decode_tensor(msg, field="x")
    assert y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape)
    assert tensor_bytes(y) == tensor_bytes(x)
    z = decode_tensor(msg, field="x", copy=True)
    assert tensor_bytes(z) == tensor_bytes(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_has_a_wire_enum_and_back(dtype: torch.dtype) -> None:
    assert torch_dtype(wire_dtype(dtype)) == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 5, 2), (2, 3)], ids=str)
def test_edge_shapes_each_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = (torch.arange(math.prod(shape)) % 2).to(dtype).reshape(shape)
    y = decode_tensor(_wire(encode_tensor(x)), field="x")
    assert y.dtype == dtype and tuple(y.shape) == shape
    assert torch.equal(y, x)


def test_values_survive_exactly() -> None:
    x = torch.tensor([1.5, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45], dtype=torch.float32)
    y = decode_tensor(_wire(encode_tensor(x)))
    assert tensor_bytes(y) == tensor_bytes(x)
    b = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    assert torch.equal(decode_tensor(_wire(encode_tensor(b))), b)
    i = torch.tensor([-(2**63), 2**63 - 1], dtype=torch.int64)
    assert torch.equal(decode_tensor(_wire(encode_tensor(i))), i)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(NUMPY_DTYPES), st.data())
def test_numpy_round_trip(np_dtype: type, data: st.DataObject) -> None:
    x = data.draw(tensors(dtype=torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype)).numpy()
    msg = _wire(encode_tensor(x))
    assert decode_array(msg).dtype == x.dtype
    assert decode_array(msg).tobytes() == x.tobytes()
    assert tensor_bytes(decode_tensor(msg)) == x.tobytes()


def test_non_contiguous_and_strided_inputs_encode_row_major() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(decode_tensor(_wire(encode_tensor(x))), x)
    a = np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]
    assert np.array_equal(decode_array(_wire(encode_tensor(a))), a)


def test_copy_is_writable_and_independent() -> None:
    msg = encode_tensor(torch.arange(4, dtype=torch.int64))
    y = decode_tensor(msg, copy=True)
    y[0] = 99
    assert decode_tensor(msg)[0] == 0


def test_unsupported_dtypes_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        encode_tensor(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError):
        encode_tensor(np.zeros(2, dtype=np.complex64))


rows_strategy = st.lists(st.lists(st.integers(-(2**40), 2**40), max_size=6), max_size=6)


@settings(max_examples=200, deadline=None)
@given(rows_strategy, st.sampled_from([torch.int64, torch.int32, torch.float32]))
def test_ragged_round_trip(rows: list[list[int]], dtype: torch.dtype) -> None:
    if dtype == torch.int32:
        rows = [[v % 2**31 for v in r] for r in rows]
    if dtype == torch.float32:
        rows = [[float(v % 1000) for v in r] for r in rows]
    tensors_in = [torch.tensor(r, dtype=dtype) for r in rows]
    msg = _wire(encode_ragged(tensors_in, dtype=dtype))
    rt = decode_ragged(msg, field="r", rows=len(rows))
    assert len(rt) == len(rows)
    assert rt.values.dtype == dtype
    assert [t.tolist() for t in rt.rows()] == [t.tolist() for t in tensors_in]
    assert rt.lengths.tolist() == [len(r) for r in rows]
    padded, mask = rt.to_padded(pad_value=-1)
    assert mask.sum().item() == sum(len(r) for r in rows)
    back = RaggedTensor.from_padded(padded, rt.lengths)
    assert [t.tolist() for t in back.rows()] == [t.tolist() for t in tensors_in]


# ---- malformed messages: each rejected with INVALID_ARGUMENT naming the field ----

def _tensor(dtype: int = pb.DTYPE_FLOAT32, shape: tuple[int, ...] = (2,), nbytes: int = 8) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=b"\0" * nbytes)


MALFORMED_TENSORS = {
    "too few bytes": (_tensor(nbytes=7), {}, "x.data"),
    "too many bytes": (_tensor(nbytes=9), {}, "x.data"),
    "bytes for a 0-d tensor of wrong size": (_tensor(shape=(), nbytes=8), {}, "x.data"),
    "negative dim": (_tensor(shape=(-2,), nbytes=0), {}, "x.shape"),
    "negative dim with zero product": (_tensor(shape=(0, -1), nbytes=0), {}, "x.shape"),
    "unset dtype": (_tensor(dtype=pb.DTYPE_UNSPECIFIED), {}, "x.dtype"),
    "unknown dtype value": (_tensor(dtype=99), {}, "x.dtype"),
    "dtype not accepted": (_tensor(), {"dtypes": (torch.int64,)}, "x.dtype"),
    "wrong ndim": (_tensor(), {"ndim": 2}, "x.shape"),
}


def _refused(decode: Callable[..., object], msg: object, name: str, kwargs: dict, field: str) -> InvalidArgument:
    """Decode `msg` (as received) as field `name`; it must raise InvalidArgument naming `field`."""
    with pytest.raises(InvalidArgument) as err:
        decode(_wire(msg), field=name, **kwargs)
    assert err.value.field == field
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return err.value


@pytest.mark.parametrize("case", list(MALFORMED_TENSORS), ids=str)
def test_malformed_tensor_is_invalid_argument(case: str) -> None:
    msg, kwargs, field = MALFORMED_TENSORS[case]
    err = _refused(decode_tensor, msg, "x", kwargs, field)
    assert str(err).startswith(field)


def test_decode_array_rejects_bf16_naming_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        decode_array(encode_tensor(torch.zeros(2, dtype=torch.bfloat16)), field="w")
    assert err.value.field == "w.dtype"


def _ragged(offsets: list[int], n: int = 3, shape: tuple[int, ...] | None = None) -> pb.Ragged:
    shape = (n,) if shape is None else shape
    return pb.Ragged(values=pb.Tensor(dtype=pb.DTYPE_INT64, shape=shape, data=b"\0" * 8 * math.prod(shape)),
                     offsets=offsets)


MALFORMED_RAGGED = {
    "no offsets": (_ragged([]), {}, "r.offsets"),
    "offsets not starting at 0": (_ragged([1, 3]), {}, "r.offsets"),
    "decreasing offsets": (_ragged([0, 2, 1, 3]), {}, "r.offsets"),
    "last offset below N": (_ragged([0, 2]), {}, "r.offsets"),
    "last offset beyond N": (_ragged([0, 4]), {}, "r.offsets"),
    "wrong number of rows": (_ragged([0, 1, 3]), {"rows": 3}, "r.offsets"),
    "values not 1-d": (_ragged([0, 4], shape=(2, 2)), {}, "r.values.shape"),
    "values wrong dtype": (_ragged([0, 3]), {"dtypes": (torch.float32,)}, "r.values.dtype"),
    "values byte length": (pb.Ragged(values=_tensor(nbytes=3), offsets=[0, 2]), {}, "r.values.data"),
    "values unset": (pb.Ragged(offsets=[0]), {}, "r.values.dtype"),
}


@pytest.mark.parametrize("case", list(MALFORMED_RAGGED), ids=str)
def test_malformed_ragged_is_invalid_argument(case: str) -> None:
    msg, kwargs, field = MALFORMED_RAGGED[case]
    _refused(decode_ragged, msg, "r", kwargs, field)


def test_empty_ragged_batch_is_valid() -> None:
    rt = decode_ragged(_wire(encode_ragged([], dtype=torch.int64)), field="r", rows=0)
    assert len(rt) == 0 and rt.rows() == []
    rt = decode_ragged(_wire(encode_ragged([torch.zeros(0, dtype=torch.int64)] * 3)), field="r")
    assert rt.lengths.tolist() == [0, 0, 0]
