"""Fuzz the reward service's Score (arithmetic rule) over real gRPC on 127.0.0.1: malformed requests
(lists of different lengths, empty or oversized batches, missing fields or answers, broken id rows)
are refused with INVALID_ARGUMENT naming the field; any text within the contract is scored (never
INTERNAL); and a good call right after returns bit-for-bit the rewards it returned before fuzzing."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import grpc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quartet.v1 import reward_pb2, reward_pb2_grpc
from services.common.codec import decode_tensor
from tests.fuzz.served import Served
from tests.fuzz.strategies import (
    DEADLINE_S,
    FUZZ,
    INT_DTYPES,
    Hostile,
    broken_ragged,
    expect_rejected,
    ragged,
)

MAX_BATCH = 16
OPTIONS = {"kind": "rule", "rule": "arithmetic", "workers": 1, "max_batch": MAX_BATCH, "timeout_seconds": 5.0}
_LIST_FIELDS = ("prompt_text", "completion_text", "metadata", "prompt_ids", "completion_ids")


def _meta(answer: str) -> reward_pb2.Metadata:
    return reward_pb2.Metadata(values={"answer": answer})


def _score(completions: list[str], answers: list[str], **kw) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(completion_text=completions, metadata=[_meta(a) for a in answers], **kw)


GOOD = _score(["71<eos>", "3", "-12 apples", "abc"], ["71", "71", "-12", "0"])


class Reward:
    def __init__(self, served: Served) -> None:
        self.stub = reward_pb2_grpc.RewardStub(served.call)
        self.baseline = self.good()
        assert decode_tensor(self.call(GOOD).rewards).tolist() == [1.0, 0.0, 1.0, 0.0]

    def call(self, request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
        return self.stub.Score(request, timeout=DEADLINE_S)

    def good(self) -> tuple[bytes, list[bool]]:
        out = self.call(GOOD)
        return out.rewards.data, list(out.failed)

    def reject_then_unchanged(self, case: Hostile) -> None:
        expect_rejected(self.call, case)
        assert self.good() == self.baseline, f"{case.why}: answers changed after it"


@pytest.fixture(scope="module")
def rew(serve: Callable[..., Served]) -> Reward:
    return Reward(serve("reward", OPTIONS, model=None))


@st.composite
def mismatched_lists(draw: st.DrawFn) -> Hostile:
    """A request whose per-sample fields disagree on B: one field has a different number of entries."""
    b = draw(st.integers(1, 6))
    sent = draw(st.sets(st.sampled_from(_LIST_FIELDS), min_size=1)) | {"completion_text", "metadata"}
    odd = draw(st.sampled_from(sorted(sent)))
    odd_b = draw(st.integers(0, 9).filter(lambda n: n != b and (n > 0 or odd in ("prompt_ids", "completion_ids"))))
    req = reward_pb2.ScoreRequest()
    for name in sent:
        n = odd_b if name == odd else b
        if name == "metadata":
            req.metadata.extend([_meta("1")] * n)
        elif name.endswith("_text"):
            getattr(req, name).extend(["1"] * n)
        else:
            getattr(req, name).CopyFrom(ragged([[1, 2]] * n))
    return Hostile(req, odd, f"{odd} has {odd_b} entries, the others {b}")


@FUZZ
@given(case=mismatched_lists())
def test_lists_of_different_lengths_are_refused(rew: Reward, case: Hostile) -> None:
    rew.reject_then_unchanged(case)


@FUZZ
@given(data=st.data())
def test_broken_id_rows_are_refused(rew: Reward, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(["prompt_ids", "completion_ids"]))
    rows = data.draw(st.lists(st.lists(st.integers(0, 50), max_size=5), min_size=1, max_size=4))
    broken = data.draw(broken_ragged(rows, allowed=INT_DTYPES, field=name))
    req = _score(["1"] * len(rows), ["1"] * len(rows))
    getattr(req, name).CopyFrom(broken.request)
    rew.reject_then_unchanged(Hostile(req, name, broken.why))


@FUZZ
@given(kind=st.sampled_from(["empty", "oversized", "no_completions", "no_answer"]), n=st.integers(1, 40))
def test_empty_oversized_or_incomplete_batches_are_refused(rew: Reward, kind: str, n: int) -> None:
    if kind == "empty":
        case = Hostile(reward_pb2.ScoreRequest(), "completion_text", "empty request")
    elif kind == "oversized":
        b = MAX_BATCH + n
        case = Hostile(_score(["1"] * b, ["1"] * b), "completion_text", f"{b} samples")
    elif kind == "no_completions":
        case = Hostile(reward_pb2.ScoreRequest(prompt_text=["1+0="] * n, metadata=[_meta("1")] * n),
                       "completion_text", "no completion_text")
    else:
        b = min(n, MAX_BATCH)
        req = _score(["1"] * b, ["1"] * b)
        req.metadata[b - 1].values.clear()
        req.metadata[b - 1].values["answers"] = "1"
        case = Hostile(req, f"metadata[{b - 1}]", "answer key missing")
    rew.reject_then_unchanged(case)


_TEXT = st.one_of(st.text(max_size=60), st.sampled_from(["9" * 5000, "-" * 300, "0" * 4400 + "1", "\x00", "٣", "𝟕𝟏"]))


@FUZZ
@given(completions=st.lists(_TEXT, min_size=1, max_size=MAX_BATCH), answer=_TEXT, want_tokens=st.booleans())
def test_any_text_is_scored(rew: Reward, completions: list[str], answer: str, want_tokens: bool) -> None:
    """Within the contract, whatever the text: one finite reward per sample, 0 or 1 (or failed)."""
    out = rew.call(_score(completions, [answer] * len(completions), want_token_rewards=want_tokens))
    rewards = decode_tensor(out.rewards, dtypes=(torch.float32,))
    assert rewards.shape == (len(completions),) and len(out.failed) == len(completions)
    assert set(rewards.tolist()) <= {0.0, 1.0}


def test_ids_only_request_names_completion_text(rew: Reward) -> None:
    """Token ids without text: the arithmetic rule needs text, and says so."""
    req = reward_pb2.ScoreRequest(completion_ids=ragged([[1, 2]]), metadata=[_meta("1")])
    err = expect_rejected(rew.call, Hostile(req, "completion_text", "ids only"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_million_empty_samples_are_refused_without_copying_them(rew: Reward) -> None:
    n = 1_000_000
    request = reward_pb2.ScoreRequest(completion_text=[""] * n)
    tracemalloc.start()  # the server runs in this process: tracemalloc sees its handler's Python objects
    try:
        expect_rejected(rew.call, Hostile(request, "completion_text", f"{n} empty samples"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rew.good() == rew.baseline
    assert peak < 16 << 20, f"refusing {n} samples allocated {peak >> 20} MiB of Python objects"
