"""Shared pieces of the fuzz tests: hostile-but-well-formed wire messages and the status checks.

Every strategy here draws a protobuf message that parses fine but breaks one rule of the contract
(protos/quartet/v1/*.proto), together with the field name the service's refusal must mention. The
services must answer each with INVALID_ARGUMENT, OUT_OF_RANGE or RESOURCE_EXHAUSTED naming that
field, quickly (every call carries a deadline), and keep serving exactly as before.

Shapes: B rows, N values in a ragged batch (offsets [B + 1]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from quartet.v1 import common_pb2 as pb

#: Codes a hostile request may get (PERMISSION_DENIED only where a test says so).
REJECT_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                          grpc.StatusCode.RESOURCE_EXHAUSTED})
#: Deadline of every fuzz call: a refusal takes milliseconds, so this only catches hangs.
DEADLINE_S = 10.0
#: Bounded fuzzing: a few dozen examples per test, no per-example deadline (gRPC calls jitter on 2 cores).
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

INT64_MAX = 2**63 - 1
#: numpy dtype of each wire dtype (bf16 shares int16's bytes); values 0 and 99 are not dtypes.
_NUMPY_OF = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT16: np.float16, pb.DTYPE_BFLOAT16: np.int16,
             pb.DTYPE_INT32: np.int32, pb.DTYPE_INT64: np.int64, pb.DTYPE_BOOL: np.bool_,
             pb.DTYPE_UINT8: np.uint8, pb.DTYPE_FLOAT64: np.float64}
FLOAT_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT64)
INT_DTYPES = (pb.DTYPE_INT32, pb.DTYPE_INT64)
NON_FINITE = (float("nan"), float("inf"), float("-inf"))
#: The field a refused token-id batch of the reference and value services names.
TOKENS = "sequences.token_ids"
#: A fixed valid batch for the reference and value services: its answer before fuzzing is the baseline.
GOOD_ROWS, GOOD_STARTS = [[5, 9, 11, 3, 7], [20, 21], [1, 2, 3, 4, 5, 6, 7, 8, 9]], [2, 1, 4]


@dataclass(frozen=True)
class Hostile:
    """One hostile request and what its refusal must say."""

    request: Any  # the protobuf request (or a list of stream chunks)
    field: str  # substring the status details must contain (the offending field)
    why: str  # what is wrong with it, for failure messages


def tensor(values: Any, wire: int) -> pb.Tensor:
    """A 1-d Tensor message of `values` stored as wire dtype `wire` (bytes consistent with the shape)."""
    arr = np.asarray(values).astype(_NUMPY_OF[wire]).reshape(-1)
    return pb.Tensor(dtype=wire, shape=[arr.size], data=arr.tobytes())


def ragged(rows: list[list[Any]], wire: int = pb.DTYPE_INT64) -> pb.Ragged:
    """A well-formed Ragged message: rows back to back, offsets [B + 1]."""
    flat = [v for r in rows for v in r]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(int).tolist()
    return pb.Ragged(values=tensor(flat, wire), offsets=offsets)


def sequence_batch(rows: list[list[int]], starts: list[int]) -> pb.SequenceBatch:
    """A well-formed SequenceBatch: token rows [B] and where each row's response starts [B]."""
    return pb.SequenceBatch(token_ids=ragged(rows), response_start=starts)


def token_rows(vocab: int, *, min_len: int = 1, max_len: int = 8, max_rows: int = 4) -> st.SearchStrategy:
    """Valid rows of token ids in [0, vocab)."""
    row = st.lists(st.integers(0, vocab - 1), min_size=min_len, max_size=max_len)
    return st.lists(row, min_size=1, max_size=max_rows)


@st.composite
def broken_ragged(draw: st.DrawFn, rows: list[list[Any]], *, allowed: tuple[int, ...], field: str) -> Hostile:
    """A Ragged over `rows` (stored as one of `allowed` dtypes) with exactly one structural defect.

    Defects: offsets empty / not starting at 0 / decreasing / not ending at N; a dtype outside
    `allowed` (or unset, or not a dtype at all); data bytes that disagree with the shape; 2-d or
    negative or astronomically large shapes. The Hostile's request is the broken Ragged.
    """
    wire = draw(st.sampled_from(allowed))
    msg = ragged(rows, wire)
    n = msg.values.shape[0]
    kind = draw(st.sampled_from(["no_offsets", "offset_start", "decreasing", "last_offset", "dtype",
                                 "bytes", "ndim", "negative_dim", "huge_dim"]))
    if kind == "no_offsets":
        del msg.offsets[:]
    elif kind == "offset_start":
        msg.offsets[0] = draw(st.one_of(st.integers(1, INT64_MAX), st.integers(-INT64_MAX, -1)))
    elif kind == "decreasing":
        msg.offsets.extend([n + 1, n])  # ..., n, n + 1, n: decreasing at the end
    elif kind == "last_offset":
        past = draw(st.booleans()) or n == 0
        msg.offsets[-1] = n + draw(st.sampled_from([1, 7, INT64_MAX - n])) if past else n - 1
    elif kind == "dtype":
        bad = draw(st.sampled_from([d for d in (*_NUMPY_OF, 0, 99) if d not in allowed]))
        if bad in _NUMPY_OF:
            msg.values.CopyFrom(tensor([v for r in rows for v in r], bad))
        else:
            msg.values.dtype = bad
    elif kind == "bytes":
        extra = draw(st.integers(1, 9))
        data = msg.values.data
        msg.values.data = data + b"\x01" * extra if draw(st.booleans()) or len(data) < extra else data[:-extra]
    elif kind == "ndim":
        msg.values.shape[:] = [n, 1] if draw(st.booleans()) else [1, n]
    elif kind == "negative_dim":
        msg.values.shape[:] = [-draw(st.integers(1, INT64_MAX))]
    else:
        msg.values.shape[:] = [draw(st.sampled_from([2**40, 2**62, INT64_MAX]))]
    return Hostile(msg, field, f"ragged {kind} on {wire}")


def out_of_vocab_ids(vocab: int) -> st.SearchStrategy[int]:
    """Token ids outside [0, vocab): just past the end, far past, negative, int64 extremes."""
    return st.one_of(st.integers(vocab, vocab + 3), st.integers(vocab, INT64_MAX),
                     st.integers(-INT64_MAX - 1, -1), st.sampled_from([INT64_MAX, -(2**63), 2**31, -(2**31)]))


def expect_rejected(call: Callable[[Any], Any], case: Hostile,
                    codes: frozenset[grpc.StatusCode] = REJECT_CODES) -> grpc.RpcError:
    """Call with the hostile request; assert it is refused with one of `codes` naming case.field."""
    try:
        call(case.request)
    except grpc.RpcError as e:
        details = e.details() or ""
        assert e.code() in codes, f"{case.why}: got {e.code()} ({details!r}), expected one of {sorted(c.name for c in codes)}"
        assert case.field in details, f"{case.why}: status details {details!r} do not name {case.field!r}"
        return e
    raise AssertionError(f"{case.why}: the service accepted it")
