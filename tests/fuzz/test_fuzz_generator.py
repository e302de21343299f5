"""Fuzz the generator (Generate, UpdateWeights) over real gRPC on 127.0.0.1 with hostile but
well-formed messages: each is refused with INVALID_ARGUMENT / OUT_OF_RANGE naming the field (a stale
weight version: FAILED_PRECONDITION), and a seeded Generate right after returns bit-for-bit the
tokens and logprobs it returned before any fuzzing, from weight version 0."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from quartet.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.common.codec import decode_ragged
from services.common.weights import iter_weight_chunks
from tests.fuzz.served import Served
from tests.fuzz.strategies import (
    DEADLINE_S,
    FUZZ,
    INT_DTYPES,
    NON_FINITE,
    REJECT_CODES,
    Hostile,
    broken_ragged,
    expect_rejected,
    out_of_vocab_ids,
    ragged,
    token_rows,
)

OPTIONS = {"max_queue": 4, "max_prompts": 8, "max_samples_per_prompt": 4, "max_new_tokens": 16,
           "max_batch_sequences": 16, "max_batch_tokens": 512, "update_wait_seconds": 5.0}
GOOD_PROMPTS = [[5, 6, 7], [9, 10], [11, 3, 4, 8]]
STALE = frozenset({grpc.StatusCode.FAILED_PRECONDITION})


def _params(**kw) -> generator_pb2.SamplingParams:
    return generator_pb2.SamplingParams(**{"n": 2, "temperature": 1.0, "max_new_tokens": 6, "seed": 7, **kw})


def _request(prompts: list[list[int]], **kw) -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(prompt_ids=ragged(prompts), params=_params(**kw))


class Generator:
    """The served generator, stubs, a valid weight stream (other weights) and the pre-fuzzing answer."""

    def __init__(self, served: Served, other_weights: dict[str, torch.Tensor]) -> None:
        self.stub = generator_pb2_grpc.GeneratorStub(served.call)
        self.admin = generator_pb2_grpc.GeneratorStub(served.admin)
        info = self.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=DEADLINE_S)
        self.vocab = int(info.vocab_size)
        self.max_positions = served.server.role.backend.info.max_positions  # not in GetInfo; 128 for the tiny model
        # Valid except for the defect each example adds; the weights differ from the served ones, so a
        # stream accepted by mistake would show in the answers.
        self.chunks = list(iter_weight_chunks(other_weights.items(), version=1, chunk_bytes=64 << 10))
        self.baseline = self.good()

    def generate(self, request: generator_pb2.GenerateRequest) -> generator_pb2.GenerateResponse:
        return self.stub.Generate(request, timeout=DEADLINE_S)

    def update(self, chunks: list[generator_pb2.WeightChunk]) -> generator_pb2.UpdateWeightsResponse:
        return self.admin.UpdateWeights(iter(chunks), timeout=DEADLINE_S)

    def good(self) -> tuple[bytes, bytes, bytes, int]:
        out = [self.generate(_request(GOOD_PROMPTS, temperature=t)) for t in (0.0, 1.0)]
        assert out[0].weight_version == out[1].weight_version
        return (out[0].completion_ids.values.data, out[1].completion_ids.values.data, out[1].logprobs.values.data,
                out[1].weight_version)

    def reject_then_unchanged(self, call, case: Hostile, codes: frozenset[grpc.StatusCode] = REJECT_CODES) -> None:
        expect_rejected(call, case, codes)
        assert self.good() == self.baseline, f"{case.why}: answers changed after it"


@pytest.fixture(scope="module")
def gen(serve: Callable[..., Served], tiny_checkpoint_other: Path) -> Generator:
    other = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint_other), dtype=torch.float32).state_dict()
    return Generator(serve("generator", OPTIONS), other)


# ---- Generate ----

@st.composite
def hostile_params(draw: st.DrawFn, vocab: int, max_positions: int) -> Hostile:
    """A request with valid prompts and one sampling parameter out of bounds."""
    prompts = draw(token_rows(vocab, max_rows=3))
    kind = draw(st.sampled_from(["n", "max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids",
                                 "sequences", "positions", "prompt_text"]))
    field = f"params.{kind}"
    params: dict = {}
    if kind == "n":
        params["n"] = draw(st.one_of(st.integers(-(2**31), 0), st.integers(OPTIONS["max_samples_per_prompt"] + 1,
                                                                          2**31 - 1)))
    elif kind == "max_new_tokens":
        params["max_new_tokens"] = draw(st.one_of(st.integers(-(2**31), 0),
                                                  st.integers(OPTIONS["max_new_tokens"] + 1, 2**31 - 1)))
    elif kind == "temperature":
        params["temperature"] = draw(st.one_of(st.floats(max_value=-0.5, width=32), st.sampled_from(NON_FINITE)))
    elif kind == "top_p":
        params["top_p"] = draw(st.one_of(st.floats(min_value=1.5, width=32), st.floats(max_value=-0.5, width=32),
                                         st.sampled_from(NON_FINITE)))
    elif kind == "top_k":
        params["top_k"] = draw(st.integers(-(2**31), -1))
    elif kind == "stop_token_ids":
        params["stop_token_ids"] = [2, draw(out_of_vocab_ids(vocab))]
    elif kind == "sequences":  # prompts x n beyond max_batch_sequences, each factor within its own limit
        prompts, params["n"], field = [[1, 2]] * 8, 3, "params.n"
    elif kind == "positions":  # prompt + max_new_tokens beyond the model's positions
        length = draw(st.integers(max_positions - 15, max_positions + 50))
        prompts, params["max_new_tokens"], field = [[3] * length], 16, "prompt_ids[0]"
    else:
        field = "prompt_text"
    req = _request(prompts, **params)
    if kind == "prompt_text":
        req.prompt_text.extend(["x"] * (len(prompts) + draw(st.sampled_from([-1, 1, 5]))))
    return Hostile(req, field, f"Generate {kind}: {params}")


@FUZZ
@given(data=st.data())
def test_generate_refuses_out_of_bounds_params(gen: Generator, data: st.DataObject) -> None:
    gen.reject_then_unchanged(gen.generate, data.draw(hostile_params(gen.vocab, gen.max_positions)))


@FUZZ
@given(data=st.data())
def test_generate_refuses_broken_prompts(gen: Generator, data: st.DataObject) -> None:
    prompts = data.draw(token_rows(gen.vocab))
    kind = data.draw(st.sampled_from(["ragged", "vocab", "empty_row"]))
    i = data.draw(st.integers(0, len(prompts) - 1))
    if kind == "ragged":
        case = data.draw(broken_ragged(prompts, allowed=INT_DTYPES, field="prompt_ids"))
        req = generator_pb2.GenerateRequest(prompt_ids=case.request, params=_params())
        gen.reject_then_unchanged(gen.generate, Hostile(req, "prompt_ids", case.why))
        return
    if kind == "vocab":
        prompts[i][data.draw(st.integers(0, len(prompts[i]) - 1))] = data.draw(out_of_vocab_ids(gen.vocab))
    else:
        prompts[i] = []
    gen.reject_then_unchanged(gen.generate, Hostile(_request(prompts), f"prompt_ids[{i}]", f"{kind}: {prompts}"))


def test_generate_without_prompts(gen: Generator) -> None:
    gen.reject_then_unchanged(gen.generate, Hostile(generator_pb2.GenerateRequest(params=_params()), "prompt_ids",
                                                    "no prompt_ids"))


# ---- UpdateWeights ----

_STREAM_KINDS = ["unknown_name", "dtype", "shape", "crc", "data_flip", "offset_negative", "offset_past_end",
                 "overlap", "no_last", "missing_chunk", "version_changes", "stale_version", "total_bytes",
                 "total_tensors", "empty_stream"]


def _copy(chunks: list[generator_pb2.WeightChunk]) -> list[generator_pb2.WeightChunk]:
    out = []
    for c in chunks:
        m = generator_pb2.WeightChunk()
        m.CopyFrom(c)
        out.append(m)
    return out


@st.composite
def hostile_streams(draw: st.DrawFn, valid: list[generator_pb2.WeightChunk]) -> Hostile:
    """The valid stream with one defect: a piece that lies about itself, or a stream that lies about its end."""
    chunks = _copy(valid)
    k = draw(st.integers(0, len(chunks) - 1))
    piece = chunks[k].pieces[draw(st.integers(0, len(chunks[k].pieces) - 1))]
    name = piece.name
    kind = draw(st.sampled_from(_STREAM_KINDS))
    field = f"weights[{name}]"
    if kind == "unknown_name":
        piece.name = name + draw(st.sampled_from([".x", "_", " ", "\u00e9"])) if draw(st.booleans()) else draw(
            st.text(min_size=0, max_size=20).filter(lambda s: s not in {p.name for c in valid for p in c.pieces}))
        field = f"weights[{piece.name}]"
    elif kind == "dtype":
        piece.dtype = draw(st.sampled_from([common_pb2.DTYPE_FLOAT16, common_pb2.DTYPE_BFLOAT16, common_pb2.DTYPE_INT32,
                                            common_pb2.DTYPE_FLOAT64, 0, 99]))
    elif kind == "shape":
        piece.shape[:] = draw(st.lists(st.integers(-3, 200), max_size=3).filter(lambda s: s != list(piece.shape)))
    elif kind == "crc":
        piece.crc32 = (piece.crc32 + draw(st.integers(1, 2**32 - 1))) % 2**32
    elif kind == "data_flip":
        data = bytearray(piece.data)
        data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        piece.data = bytes(data)
        field = f"weights[{name}].crc32"
    elif kind == "offset_negative":
        piece.offset = -draw(st.integers(1, 2**62))
        field = f"weights[{name}].offset"
    elif kind == "offset_past_end":
        piece.offset += draw(st.integers(1, 2**62))
        field = f"weights[{name}].offset"
    elif kind == "overlap":
        chunks[-1].pieces.add().CopyFrom(piece)
        field = f"weights[{name}].offset"
    elif kind == "no_last":
        chunks[-1].last = False
        field = "last"
    elif kind == "missing_chunk":
        if k == len(chunks) - 1:
            chunks[k - 1].last = True
        del chunks[k]
        field = "weights"  # "weights: incomplete update: missing ..."
    elif kind == "version_changes":
        chunks[-1].version = draw(st.sampled_from([2, 0, 2**64 - 1]))
        field = "version"
    elif kind == "stale_version":
        for c in chunks:
            c.version = 0
        field = "version"
    elif kind == "total_bytes":
        chunks[0].total_bytes += draw(st.sampled_from([-1, 1, 2**40]))
        field = "total_bytes"
    elif kind == "total_tensors":
        chunks[0].total_tensors += draw(st.sampled_from([-1, 1, 1000]))
        field = "total_tensors"
    else:
        chunks, field = [], "last"
    return Hostile(chunks, field, f"UpdateWeights {kind} (chunk {k}, {name})")


@FUZZ
@given(data=st.data())
def test_update_weights_refuses_hostile_streams(gen: Generator, data: st.DataObject) -> None:
    case = data.draw(hostile_streams(gen.chunks))
    codes = STALE if case.why.startswith("UpdateWeights stale_version") else REJECT_CODES
    gen.reject_then_unchanged(gen.update, case, codes)


@pytest.mark.parametrize(("name", "value"), [("model.norm.weight", float("nan")),
                                           ("model.embed_tokens.weight", float("inf")),
                                           ("model.layers.1.mlp.down_proj.weight", float("-inf"))])
def test_update_weights_refuses_non_finite_values(serve: Callable[..., Served], tiny_checkpoint: Path, name: str,
                                                  value: float) -> None:
    """One non-finite weight anywhere: refused naming the tensor, the old weights keep serving."""
    state = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).state_dict()
    # Its own server: an accepted NaN update must not reach the other tests.
    with serve("generator", OPTIONS) as served:
        g = Generator(served, state)
        state[name] = state[name].clone()
        state[name].view(-1)[-3] = value
        chunks = list(iter_weight_chunks(state.items(), version=1, chunk_bytes=16 << 10))
        g.reject_then_unchanged(g.update, Hostile(chunks, f"weights[{name}]", f"{value} in {name}"))


# ---- within the contract, however extreme ----

@FUZZ
@given(data=st.data())
def test_extreme_but_valid_params_are_served(gen: Generator, data: st.DataObject) -> None:
    """Any parameters inside the contract: OK, ids in the vocabulary, finite raw logprobs <= 0."""
    prompts = data.draw(token_rows(gen.vocab, max_rows=3))
    params = {
        "n": data.draw(st.integers(1, OPTIONS["max_samples_per_prompt"])),
        "temperature": data.draw(st.one_of(st.floats(min_value=0.0, width=32, allow_infinity=False, allow_nan=False), st.sampled_from([0.0, 1e-45, 1e-30, 3e38]))),
        "top_p": data.draw(st.one_of(st.floats(0.0, 1.0, width=32, exclude_min=True), st.just(0.0))),
        "top_k": data.draw(st.one_of(st.integers(0, 2**31 - 1), st.integers(0, gen.vocab + 1))),
        "max_new_tokens": data.draw(st.integers(1, OPTIONS["max_new_tokens"])),
        "seed": data.draw(st.integers(0, 2**64 - 1)),
        "stop_token_ids": data.draw(st.lists(st.integers(0, gen.vocab - 1), max_size=5)),
    }
    out = gen.generate(_request(prompts, **params))
    ids = decode_ragged(out.completion_ids, dtypes=(torch.int64,))
    logprobs = decode_ragged(out.logprobs, dtypes=(torch.float32,))
    assert len(ids) == len(prompts) * params["n"] and torch.equal(ids.lengths, logprobs.lengths)
    assert bool(((ids.values >= 0) & (ids.values < gen.vocab)).all())
    assert bool(torch.isfinite(logprobs.values).all()) and bool((logprobs.values <= 0).all())
    assert int(ids.lengths.max()) <= params["max_new_tokens"]


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-45])  # 1e-45: the smallest float32 > 0
def test_tiny_temperature_is_greedy(gen: Generator, temperature: float) -> None:
    """As temperature -> 0+ sampling tends to the argmax: a tiny positive temperature gives the greedy tokens."""
    greedy = gen.generate(_request(GOOD_PROMPTS, temperature=0.0)).completion_ids.values.data
    assert gen.generate(_request(GOOD_PROMPTS, temperature=temperature)).completion_ids.values.data == greedy
