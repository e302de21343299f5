"""Tensors on the wire: torch / numpy <-> `quartet.v1.Tensor` and `quartet.v1.Ragged`.

A `Tensor` is raw little-endian row-major bytes plus dtype and shape. Decoding is zero-copy
(`torch.frombuffer` over the message's bytes) unless `copy=True`; the result then shares memory
with an immutable `bytes` object, so callers that write into it must ask for a copy. Encoding
costs one copy, into the `bytes` that protobuf needs.

Every malformed message raises `InvalidArgument` naming the field, which the server maps to
INVALID_ARGUMENT.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from quartet.v1 import common_pb2 as pb
from services.common.errors import InvalidArgument

if sys.byteorder != "little":  # pragma: no cover - every platform we ship on is little-endian
    raise ImportError("the Quartet tensor codec assumes a little-endian host")

# torch.frombuffer over immutable bytes warns on every call; read-only use is the point here.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

_TORCH_OF: dict[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_BOOL: torch.bool,
    pb.DTYPE_UINT8: torch.uint8,
    pb.DTYPE_FLOAT64: torch.float64,
}
_WIRE_OF: dict[torch.dtype, int] = {v: k for k, v in _TORCH_OF.items()}
_NUMPY_TO_TORCH: dict[np.dtype, torch.dtype] = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.float64): torch.float64,
}


def wire_dtype(dtype: torch.dtype) -> int:
    """The `DType` enum value of a torch dtype; ValueError for dtypes the wire does not carry."""
    try:
        return _WIRE_OF[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent; supported: {sorted(map(str, _WIRE_OF))}") from None


def torch_dtype(wire: int, *, field: str = "tensor") -> torch.dtype:
    """The torch dtype of a `DType` enum value; InvalidArgument naming `field` if unknown."""
    try:
        return _TORCH_OF[wire]
    except KeyError:
        name = pb.DType.Name(wire) if wire in pb.DType.values() else str(wire)
        raise InvalidArgument(f"{field}.dtype", f"unsupported or unset dtype {name}") from None


def tensor_bytes(x: torch.Tensor) -> bytes:
    """Row-major bytes of a CPU tensor (one copy). bf16 has no numpy type, so go through int16."""
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.contiguous()
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.view(torch.int16).numpy().tobytes()
    return x.numpy().tobytes()


def encode_tensor(x: torch.Tensor | np.ndarray) -> pb.Tensor:
    """torch.Tensor or numpy array (any shape, 0-d included) -> `Tensor` message."""
    if isinstance(x, np.ndarray):
        if x.dtype not in _NUMPY_TO_TORCH:
            raise ValueError(f"numpy dtype {x.dtype} cannot be sent")
        arr = np.ascontiguousarray(x)
        return pb.Tensor(dtype=_WIRE_OF[_NUMPY_TO_TORCH[arr.dtype]], shape=arr.shape, data=arr.tobytes())
    return pb.Tensor(dtype=wire_dtype(x.dtype), shape=tuple(x.shape), data=tensor_bytes(x))


def _check_shape(msg: pb.Tensor, field: str, dtype: torch.dtype) -> tuple[int, ...]:
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"negative dimension in {list(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise InvalidArgument(
            f"{field}.data",
            f"has {len(msg.data)} bytes but shape {list(shape)} of {dtype} needs {numel * itemsize}",
        )
    return shape


def decode_tensor(
    msg: pb.Tensor,
    *,
    field: str = "tensor",
    dtypes: Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    copy: bool = False,
) -> torch.Tensor:
    """`Tensor` message -> torch.Tensor on CPU.

    Args:
        field: name used in error messages (e.g. "rewards").
        dtypes: if given, the accepted dtypes; others are INVALID_ARGUMENT.
        ndim: if given, the required number of dimensions.
        copy: return a writable copy instead of a zero-copy view of the message bytes.
    """
    dtype = torch_dtype(msg.dtype, field=field)
    if dtypes is not None and dtype not in dtypes:
        raise InvalidArgument(f"{field}.dtype", f"got {dtype}, expected one of {[str(d) for d in dtypes]}")
    shape = _check_shape(msg, field, dtype)
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"{field}.shape", f"expected {ndim} dimensions, got shape {list(shape)}")
    if len(msg.data) == 0:
        return torch.empty(shape, dtype=dtype)
    out = torch.frombuffer(msg.data, dtype=dtype).reshape(shape)
    return out.clone() if copy else out


def decode_array(msg: pb.Tensor, *, field: str = "tensor") -> np.ndarray:
    """`Tensor` message -> read-only numpy array (zero-copy). bfloat16 has no numpy type: use decode_tensor."""
    dtype = torch_dtype(msg.dtype, field=field)
    if dtype == torch.bfloat16:
        raise InvalidArgument(f"{field}.dtype", "bfloat16 has no numpy equivalent; decode with decode_tensor")
    shape = _check_shape(msg, field, dtype)
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return np.frombuffer(msg.data, dtype=np_dtype).reshape(shape)


@dataclass(frozen=True)
class RaggedTensor:
    """A batch of variable-length rows: row i is values[offsets[i]:offsets[i+1]].

    values: [N] flat rows back to back. offsets: int64 [B + 1], offsets[0] = 0, offsets[-1] = N.
    """

    values: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_rows(cls, rows: Sequence[torch.Tensor | Sequence[float] | Sequence[int]],
                  dtype: torch.dtype | None = None) -> RaggedTensor:
        tensors = [r if isinstance(r, torch.Tensor) else torch.as_tensor(r, dtype=dtype) for r in rows]
        lengths = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
        offsets = torch.zeros(len(tensors) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        if tensors:
            values = torch.cat([t.reshape(-1) for t in tensors])
        else:
            values = torch.empty(0, dtype=dtype or torch.float32)
        if dtype is not None:
            values = values.to(dtype)
        return cls(values, offsets)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """int64 [B] row lengths."""
        return self.offsets[1:] - self.offsets[:-1]

    def row(self, i: int) -> torch.Tensor:
        return self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def rows(self) -> list[torch.Tensor]:
        """Views of every row, in order."""
        return list(torch.split(self.values, self.lengths.tolist())) if len(self) else []

    def to_padded(self, pad_value: float = 0, *, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded [B, W] values and the float mask [B, W] (1 on real entries); W = max length."""
        lengths = self.lengths
        w = int(lengths.max()) if width is None and len(self) else (width or 0)
        out = torch.full((len(self), w), pad_value, dtype=self.values.dtype)
        mask = torch.arange(w).unsqueeze(0) < lengths.unsqueeze(1)
        out[mask] = self.values
        return out, mask.to(torch.float32)

    @classmethod
    def from_padded(cls, padded: torch.Tensor, lengths: Sequence[int] | torch.Tensor) -> RaggedTensor:
        """Inverse of to_padded: keep the first lengths[i] entries of row i of `padded` [B, W]."""
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        mask = torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        return cls(padded[mask], offsets)


def encode_ragged(x: RaggedTensor | Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> pb.Ragged:
    """RaggedTensor (or a list of 1-d rows) -> `Ragged` message."""
    if not isinstance(x, RaggedTensor):
        x = RaggedTensor.from_rows(x, dtype=dtype)
    values = x.values if dtype is None else x.values.to(dtype)
    return pb.Ragged(values=encode_tensor(values), offsets=x.offsets.tolist())


def decode_ragged(
    msg: pb.Ragged,
    *,
    field: str = "ragged",
    dtypes: Sequence[torch.dtype] | None = None,
    rows: int | None = None,
    max_rows: int | None = None,
    limit_name: str = "max_batch_sequences",
) -> RaggedTensor:
    """`Ragged` message -> RaggedTensor, checking that the offsets describe the values exactly.

    Args:
        rows: if given, the required number of rows B.
        max_rows: if given, the most rows B the caller accepts (its max_batch_sequences). Checked on
            the length of the repeated field before anything is converted, so a request of millions
            of offsets is refused without allocating for them.
        limit_name: the option named in that refusal (e.g. "max_prompts" for the generator).
    """
    # Counts first, on the repeated field's length: a row count that is wrong or over the limit is
    # refused before a single offset is converted.
    n_offsets = len(msg.offsets)
    if n_offsets == 0:
        raise InvalidArgument(f"{field}.offsets", "must have B + 1 entries starting at 0 (got none)")
    if rows is not None and n_offsets - 1 != rows:
        raise InvalidArgument(f"{field}.offsets", f"describes {n_offsets - 1} rows, expected {rows}")
    check_row_limit(n_offsets - 1, field=f"{field}.offsets", max_rows=max_rows, limit_name=limit_name)
    values = decode_tensor(msg.values, field=f"{field}.values", dtypes=dtypes, ndim=1)
    # upb's repeated scalar containers implement __array__: one C copy (8M offsets: ~25 ms), where
    # list() made a Python int per entry (~1.2 s, 64 MB of pointers plus the ints).
    offsets = torch.from_numpy(np.asarray(msg.offsets, dtype=np.int64))
    if int(offsets[0]) != 0:
        raise InvalidArgument(f"{field}.offsets", f"must start at 0, got {int(offsets[0])}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise InvalidArgument(f"{field}.offsets", "must be non-decreasing")
    if int(offsets[-1]) != values.numel():
        raise InvalidArgument(
            f"{field}.offsets", f"last offset {int(offsets[-1])} does not match {values.numel()} values"
        )
    return RaggedTensor(values, offsets)


def check_row_limit(n: int, *, field: str, max_rows: int | None, limit_name: str = "max_batch_sequences",
                    noun: str = "rows") -> None:
    """InvalidArgument naming `field` if a repeated field describes more than `max_rows` rows (None: no limit).

    Callers pass the length of a repeated field before copying it, so the check costs nothing.
    """
    if max_rows is not None and n > max_rows:
        raise InvalidArgument(field, f"describes {n} {noun}; the limit is {limit_name}={max_rows}")


def decode_sequences(
    batch: pb.SequenceBatch, *, field: str = "sequences", max_rows: int | None = None
) -> tuple[RaggedTensor, list[int]]:
    """`SequenceBatch` -> (ragged int ids [B rows], response starts [B]); an empty batch is named as such.

    max_rows: the most sequences B accepted (the role's max_batch_sequences), checked on the length of
    `token_ids.offsets` before it is converted; `response_start` is copied only once its length matches.
    """
    tokens_field = f"{field}.token_ids"
    if len(batch.token_ids.offsets) <= 1:
        raise InvalidArgument(tokens_field, "empty batch: send at least one sequence")
    rows = decode_ragged(batch.token_ids, field=tokens_field, dtypes=(torch.int64, torch.int32), max_rows=max_rows)
    if len(batch.response_start) != len(rows):
        raise InvalidArgument(
            f"{field}.response_start",
            f"has {len(batch.response_start)} entries for {len(rows)} sequences; send one per sequence",
        )
    return rows, list(batch.response_start)


def encode_sequences(rows: Sequence[Sequence[int]], response_start: Sequence[int]) -> pb.SequenceBatch:
    """Token rows (prompt ++ response) and where each response starts -> `SequenceBatch`."""
    return pb.SequenceBatch(
        token_ids=encode_ragged([torch.as_tensor(r, dtype=torch.int64) for r in rows], dtype=torch.int64),
        response_start=list(response_start),
    )
