"""Fuzz the reference service's LogProbs over real gRPC on 127.0.0.1 with hostile but well-formed
requests: each is refused with INVALID_ARGUMENT / OUT_OF_RANGE naming the field, and a good call right
after returns bit-for-bit the log-probabilities it returned before any fuzzing."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import grpc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quartet.v1 import common_pb2, reference_pb2, reference_pb2_grpc
from services.common.codec import decode_ragged
from tests.fuzz.served import Served
from tests.fuzz.strategies import (
    DEADLINE_S,
    FUZZ,
    GOOD_ROWS,
    GOOD_STARTS,
    INT64_MAX,
    INT_DTYPES,
    TOKENS,
    Hostile,
    broken_ragged,
    expect_rejected,
    out_of_vocab_ids,
    sequence_batch,
    token_rows,
)

STARTS = "sequences.response_start"
LIMITS = {"max_batch_tokens": 64, "max_batch_sequences": 8, "max_tokens_per_call": 200, "max_concurrent": 2}


def _request(rows: list[list[int]], starts: list[int]) -> reference_pb2.LogProbsRequest:
    return reference_pb2.LogProbsRequest(sequences=sequence_batch(rows, starts))


class Reference:
    """The served reference role, a stub, and its answer to a fixed good batch before any fuzzing."""

    def __init__(self, served: Served) -> None:
        self.channel = served.call
        self.stub = reference_pb2_grpc.ReferenceStub(self.channel)
        self.vocab = int(self.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=DEADLINE_S).vocab_size)
        self.baseline = self.good().logprobs.values.data

    def call(self, request: reference_pb2.LogProbsRequest) -> reference_pb2.LogProbsResponse:
        return self.stub.LogProbs(request, timeout=DEADLINE_S)

    def good(self) -> reference_pb2.LogProbsResponse:
        return self.call(_request(GOOD_ROWS, GOOD_STARTS))

    def reject_then_unchanged(self, case: Hostile) -> None:
        expect_rejected(self.call, case)
        assert self.good().logprobs.values.data == self.baseline, f"{case.why}: answers changed after it"


@pytest.fixture(scope="module")
def ref(serve: Callable[..., Served]) -> Reference:
    return Reference(serve("reference", LIMITS))


@FUZZ
@given(data=st.data())
def test_broken_ragged_token_ids(ref: Reference, data: st.DataObject) -> None:
    rows = data.draw(token_rows(ref.vocab, min_len=2))
    case = data.draw(broken_ragged(rows, allowed=INT_DTYPES, field=TOKENS))
    request = reference_pb2.LogProbsRequest(
        sequences=common_pb2.SequenceBatch(token_ids=case.request, response_start=[1] * len(rows)))
    ref.reject_then_unchanged(Hostile(request, TOKENS, case.why))


@FUZZ
@given(data=st.data())
def test_bad_response_starts(ref: Reference, data: st.DataObject) -> None:
    rows = data.draw(token_rows(ref.vocab))
    lengths = [len(r) for r in rows]
    starts = [data.draw(st.integers(1, n)) for n in lengths]
    kind = data.draw(st.sampled_from(["zero_or_negative", "past_end", "too_few", "too_many", "extreme"]))
    i = data.draw(st.integers(0, len(rows) - 1))
    if kind == "zero_or_negative":
        starts[i] = data.draw(st.integers(-INT64_MAX, 0))
    elif kind == "past_end":
        starts[i] = lengths[i] + data.draw(st.integers(1, 1000))
    elif kind == "too_few":
        starts = starts[:i]
    elif kind == "too_many":
        starts = starts + [1] * data.draw(st.integers(1, 3))
    else:
        starts[i] = data.draw(st.sampled_from([INT64_MAX, -(2**63)]))
    ref.reject_then_unchanged(Hostile(_request(rows, starts), STARTS, f"response_start {kind}: {starts}"))


@FUZZ
@given(data=st.data())
def test_token_ids_outside_the_vocabulary(ref: Reference, data: st.DataObject) -> None:
    rows = data.draw(token_rows(ref.vocab, min_len=2))
    i = data.draw(st.integers(0, len(rows) - 1))
    j = data.draw(st.integers(0, len(rows[i]) - 1))
    rows[i][j] = data.draw(out_of_vocab_ids(ref.vocab))
    case = Hostile(_request(rows, [1] * len(rows)), TOKENS, f"token id {rows[i][j]} in row {i}")
    err = expect_rejected(ref.call, case)
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    assert ref.good().logprobs.values.data == ref.baseline


@FUZZ
@given(kind=st.sampled_from(["rows", "tokens", "row_length"]), extra=st.integers(1, 50))
def test_batches_beyond_the_limits(ref: Reference, kind: str, extra: int) -> None:
    if kind == "rows":
        rows = [[1, 2]] * (LIMITS["max_batch_sequences"] + extra)
    elif kind == "tokens":  # few rows, each within the row limit, too many in all
        rows = [[3] * 50] * 4 + [[4] * extra]
    else:
        rows = [[5] * (LIMITS["max_batch_tokens"] + extra)]
    ref.reject_then_unchanged(Hostile(_request(rows, [1] * len(rows)), TOKENS, f"{kind} over the limit by {extra}"))


def test_missing_sequences_is_an_empty_batch(ref: Reference) -> None:
    ref.reject_then_unchanged(Hostile(reference_pb2.LogProbsRequest(), TOKENS, "no sequences field"))
    ref.reject_then_unchanged(Hostile(_request([], []), TOKENS, "zero rows"))


@FUZZ
@given(data=st.data())
def test_valid_random_batches_are_answered(ref: Reference, data: st.DataObject) -> None:
    """The other side of the fuzzing: anything within the contract gets finite rows of the right lengths."""
    rows = data.draw(token_rows(ref.vocab, min_len=1, max_len=12, max_rows=6))
    starts = [data.draw(st.integers(1, len(r))) for r in rows]  # start == len: an empty response row
    got = decode_ragged(ref.call(_request(rows, starts)).logprobs, dtypes=(torch.float32,))
    assert got.lengths.tolist() == [len(r) - s for r, s in zip(rows, starts, strict=True)]
    assert bool(torch.isfinite(got.values).all()) and bool((got.values <= 0).all())


def test_millions_of_offsets_are_refused_without_decoding_them(ref: Reference) -> None:
    n = 8_000_000  # an 8 MB message: fine for the transport, 1M times max_batch_sequences
    batch = common_pb2.SequenceBatch(token_ids=common_pb2.Ragged(
        values=common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[0]), offsets=bytes(n)))  # n zeros
    data = reference_pb2.LogProbsRequest(sequences=batch).SerializeToString()
    # gRPC's server side alone holds the received bytes twice (~15 MiB here, whatever the handler does):
    # measured on GetInfo, which decodes nothing, and subtracted. Both calls send pre-serialised bytes.
    raw = {m: ref.channel.unary_unary(f"/quartet.v1.Reference/{m}", request_serializer=None,
                                      response_deserializer=None) for m in ("GetInfo", "LogProbs")}
    # The server runs in this process: tracemalloc sees the Python objects its handler builds.
    tracemalloc.start()
    try:
        raw["GetInfo"](data, timeout=DEADLINE_S)
        transport = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        expect_rejected(lambda r: raw["LogProbs"](r, timeout=DEADLINE_S), Hostile(data, "sequences", f"{n} offsets"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ref.good().logprobs.values.data == ref.baseline
    extra = peak - transport
    assert extra < 4 << 20, f"refusing {n} rows allocated {extra >> 20} MiB beyond the transport's: it decoded them first"
