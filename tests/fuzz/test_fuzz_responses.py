"""Fuzz the orchestrator's checks of what the generator and the reward services answer (Generate,
GetInfo, Score; orchestrator/remote/clients.py). The reference's and the value's answers are fuzzed in
test_fuzz_responses_reference_value.py.

Each client method is called as the run loop calls it, against a stub that returns a drawn
response (tests/fuzz/answering.py). A well-formed response is accepted and decoded exactly; a
response with one hostile defect (wrong counts, non-finite rewards / logprobs, token ids outside the
vocabulary, offsets that do not add up, wrong dtypes or shapes, negative lengths, impossible scalars)
raises ServiceError naming the service, the call and the field, and returns nothing. Arbitrary bytes
in every array field raise ServiceError or decode into a response that passes every check: never
IndexError, ValueError, RuntimeError or anything else.

Shapes: P prompts, n samples each, B = P * n samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.remote.clients import GeneratorClient, RewardClient, Samples, ServiceError
from quartet.v1 import common_pb2 as pb
from quartet.v1 import generator_pb2, reward_pb2
from tests.fuzz.answering import (
    ADDRESS,
    FLOAT16_OVERFLOW,
    RESPONSES,
    answering,
    arbitrary_ragged,
    arbitrary_tensor,
    refused,
)
from tests.fuzz.strategies import (
    INT64_MAX,
    INT_DTYPES,
    NON_FINITE,
    broken_ragged,
    out_of_vocab_ids,
    ragged,
    tensor,
)

STOP, LENGTH = generator_pb2.FINISH_REASON_STOP, generator_pb2.FINISH_REASON_LENGTH
pytestmark = FLOAT16_OVERFLOW


# ---- Generate ------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """A well-formed Generate answer, as plain lists (mutated into hostile ones below)."""

    p: int
    n: int
    vocab: int
    max_new_tokens: int
    ids: list[list[int]]  # [B] rows of length 1..max_new_tokens, ids in [0, vocab)
    logprobs: list[list[float]]  # [B] aligned with ids, finite, <= 0
    reasons: list[int]  # [B] STOP | LENGTH
    prompt_index: list[int]  # [B] k // n, or [] (the field is optional)
    texts: list[str]  # [B]

    def message(self, ids_msg: pb.Ragged | None = None, lp_msg: pb.Ragged | None = None) -> Any:
        return generator_pb2.GenerateResponse(
            completion_ids=ids_msg or ragged(self.ids, pb.DTYPE_INT64),
            logprobs=lp_msg or ragged(self.logprobs, pb.DTYPE_FLOAT32),
            finish_reasons=self.reasons, prompt_index=self.prompt_index, completion_text=self.texts, weight_version=4,
        )

    def check(self, response: Any) -> Samples:
        client = answering(GeneratorClient, response)
        client.vocab_size = self.vocab
        return client.generate([[1]] * self.p, n=self.n, temperature=1.0, top_p=1.0, top_k=0,
                               max_new_tokens=self.max_new_tokens, stop_token_ids=[], seed=0, request_id="fuzz")


@st.composite
def rollouts(draw: st.DrawFn) -> Rollout:
    p, n, vocab, m = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 64)), draw(st.integers(1, 6))
    b = p * n
    ids = [draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=m)) for _ in range(b)]
    logprob = st.floats(-30.0, 0.0, width=32)
    logprobs = [draw(st.lists(logprob, min_size=len(r), max_size=len(r))) for r in ids]
    reasons = draw(st.lists(st.sampled_from([STOP, LENGTH]), min_size=b, max_size=b))
    index = [k // n for k in range(b)] if draw(st.booleans()) else []
    texts = draw(st.lists(st.text(max_size=6), min_size=b, max_size=b))
    return Rollout(p, n, vocab, m, ids, logprobs, reasons, index, texts)


@given(rollouts())
@RESPONSES
def test_a_good_generate_answer_is_decoded_exactly(r: Rollout) -> None:
    s = r.check(r.message())
    assert s.completion_ids == r.ids and s.logprobs == r.logprobs  # drawn as float32: exact
    assert s.finished == [x == STOP for x in r.reasons] and s.texts == r.texts and s.weight_version == 4


GENERATE_DEFECTS = ("count", "ids_ragged", "vocab", "empty_row", "long_row", "lp_ragged", "lp_nonfinite",
                    "lp_positive", "lp_lengths", "finish_count", "finish_unknown", "prompt_index", "texts")


@given(rollouts(), st.sampled_from(GENERATE_DEFECTS), st.data())
@RESPONSES
def test_a_hostile_generate_answer_is_refused(r: Rollout, defect: str, data: st.DataObject) -> None:
    draw, b = data.draw, len(r.ids)
    ids_msg = lp_msg = None
    field = {"finish_count": "finish_reasons", "finish_unknown": "finish_reasons", "prompt_index": "prompt_index",
             "texts": "completion_text"}.get(defect, "logprobs" if defect.startswith("lp_") else "completion_ids")
    if defect == "count":  # one sample too many or too few, logprobs consistent with the ids sent
        r.ids, r.logprobs = ([*r.ids, [0]], [*r.logprobs, [-1.0]]) if draw(st.booleans()) or b == 1 else (
            r.ids[:-1], r.logprobs[:-1])
    elif defect == "ids_ragged":
        ids_msg = draw(broken_ragged(r.ids, allowed=INT_DTYPES, field=field)).request
    elif defect == "vocab":
        row = draw(st.integers(0, b - 1))
        r.ids[row][draw(st.integers(0, len(r.ids[row]) - 1))] = draw(out_of_vocab_ids(r.vocab))
    elif defect in ("empty_row", "long_row"):  # negative lengths cannot be sent: offsets must not decrease
        row = draw(st.integers(0, b - 1))
        r.ids[row] = [] if defect == "empty_row" else [0] * (r.max_new_tokens + 1)
        r.logprobs[row] = [-1.0] * len(r.ids[row])
    elif defect == "lp_ragged":
        lp_msg = draw(broken_ragged(r.logprobs, allowed=(pb.DTYPE_FLOAT32,), field=field)).request
    elif defect in ("lp_nonfinite", "lp_positive"):
        row = draw(st.integers(0, b - 1))
        bad = draw(st.sampled_from(NON_FINITE)) if defect == "lp_nonfinite" else draw(st.floats(2**-9, 2**99, width=32))
        r.logprobs[row][draw(st.integers(0, len(r.logprobs[row]) - 1))] = bad
    elif defect == "lp_lengths":  # logprob rows that do not line up with the id rows
        row = draw(st.integers(0, b - 1))
        if b > 1 and len(r.logprobs[row]) > 1 and draw(st.booleans()):  # same total, split differently
            r.logprobs[(row + 1) % b].append(r.logprobs[row].pop())
        else:
            r.logprobs[row].append(-1.0)
    elif defect == "finish_count":
        r.reasons = r.reasons[:-1] if draw(st.booleans()) else [*r.reasons, STOP]
    elif defect == "finish_unknown":
        r.reasons[draw(st.integers(0, b - 1))] = draw(st.sampled_from([0, 3, 4, 99, 2**31 - 1]))
    elif defect == "prompt_index":
        r.prompt_index = [k // r.n for k in range(b)]
        k = draw(st.integers(0, b - 1))
        r.prompt_index[k] = draw(st.integers(-(2**31), 2**31 - 1).filter(lambda v: v != k // r.n))
    else:
        r.texts = r.texts[:-1] if draw(st.booleans()) else [*r.texts, "x"]
    refused(lambda: r.check(r.message(ids_msg, lp_msg)), service="generator", rpc="Generate", field=field,
             why=defect)


# ---- Score ---------------------------------------------------------------------------------------


def _score(b: int, response: Any) -> Any:
    client = answering(RewardClient, response)
    return client.score([[1]] * b, [[2]] * b, ["p"] * b, ["c"] * b, [{}] * b)


def _tensor_defect(draw: st.DrawFn, values: list[float]) -> pb.Tensor:
    """A 1-d float32 Tensor of `values` with one defect: dtype, byte count, 2-d, negative or huge shape."""
    msg = tensor(values, pb.DTYPE_FLOAT32)
    kind = draw(st.sampled_from(["dtype", "unset", "bytes", "ndim", "negative_dim", "huge_dim"]))
    if kind == "dtype":
        wire = draw(st.sampled_from([pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT64, *INT_DTYPES,
                                     pb.DTYPE_BOOL, pb.DTYPE_UINT8]))
        msg = tensor(values, wire)
    elif kind == "unset":
        msg.dtype = draw(st.sampled_from([0, 99, -1]))
    elif kind == "bytes":
        msg.data = msg.data + b"\x00" * draw(st.integers(1, 7)) if draw(st.booleans()) else msg.data[:-1]
    elif kind == "ndim":
        msg.shape[:] = [len(values), 1] if draw(st.booleans()) else [1, len(values)]
    elif kind == "negative_dim":
        msg.shape[:] = [-draw(st.integers(1, INT64_MAX))]
    else:
        msg.shape[:] = [draw(st.sampled_from([2**40, 2**61, INT64_MAX]))]
    return msg


finite_rewards = st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=8)


@given(finite_rewards, st.booleans())
@RESPONSES
def test_a_good_score_answer_is_decoded_exactly(rewards: list[float], with_failed: bool) -> None:
    b = len(rewards)
    failed = [i % 2 == 0 for i in range(b)] if with_failed else []
    s = _score(b, reward_pb2.ScoreResponse(rewards=tensor(rewards, pb.DTYPE_FLOAT32), failed=failed, identity="r"))
    assert s.rewards.tolist() == rewards and s.failed == (failed or [False] * b) and s.identity == "r"


@given(finite_rewards, st.sampled_from(["count", "nonfinite", "tensor", "failed"]), st.data())
@RESPONSES
def test_a_hostile_score_answer_is_refused(rewards: list[float], defect: str, data: st.DataObject) -> None:
    draw, b = data.draw, len(rewards)
    msg, failed, field = tensor(rewards, pb.DTYPE_FLOAT32), [], "rewards"
    if defect == "count":
        msg = tensor(rewards + [0.0] * draw(st.integers(1, 3)) if draw(st.booleans()) or b == 1 else rewards[:-1],
                     pb.DTYPE_FLOAT32)
    elif defect == "nonfinite":
        rewards[draw(st.integers(0, b - 1))] = draw(st.sampled_from(NON_FINITE))
        msg = tensor(rewards, pb.DTYPE_FLOAT32)
    elif defect == "tensor":
        msg = _tensor_defect(draw, rewards)
    else:
        failed, field = [True] * draw(st.integers(1, 12).filter(lambda k: k != b)), "failed"
    refused(lambda: _score(b, reward_pb2.ScoreResponse(rewards=msg, failed=failed)), service="reward", rpc="Score",
             field=field, why=defect)


# ---- GetInfo -------------------------------------------------------------------------------------


@given(st.sampled_from(["vocab_size", "last_step_id"]), st.data())
@RESPONSES
def test_a_hostile_generator_info_is_refused_and_changes_nothing(field: str, data: st.DataObject) -> None:
    bad = data.draw(st.integers(-(2**31), 0) if field == "vocab_size" else st.integers(-INT64_MAX - 1, -2))
    info = {"role": "generator", "vocab_size": 32, "last_step_id": -1, field: bad}
    client = answering(GeneratorClient, pb.ServiceInfo(**info))
    client.vocab_size = 17
    refused(client.info, service="generator", rpc="GetInfo", field=field, why=f"{field}={bad}")
    assert client.vocab_size == 17  # nothing of the refused answer was kept


# ---- arbitrary bytes: ServiceError or a response that passes every check, nothing else -----------


@given(arbitrary_ragged, arbitrary_ragged, st.integers(1, 3), st.integers(1, 2))
@RESPONSES
def test_arbitrary_generate_bytes_raise_service_error_or_pass_every_check(
        ids: pb.Ragged, lps: pb.Ragged, p: int, n: int) -> None:
    b = p * n
    r = Rollout(p, n, 10, 6, [], [], [STOP] * b, [], ["t"] * b)
    try:
        s = r.check(r.message(ids, lps))
    except ServiceError as e:
        assert e.service == f"generator at {ADDRESS}" and e.call == "Generate"
        return
    assert len(s.completion_ids) == b
    for row, lp in zip(s.completion_ids, s.logprobs, strict=True):
        assert 1 <= len(row) == len(lp) <= 6 and all(0 <= t < 10 for t in row)
        assert all(math.isfinite(v) and v <= 1e-4 for v in lp)


@given(arbitrary_tensor, st.integers(1, 6))
@RESPONSES
def test_arbitrary_reward_bytes_raise_service_error_or_pass_every_check(rewards: pb.Tensor, b: int) -> None:
    try:
        s = _score(b, reward_pb2.ScoreResponse(rewards=rewards))
    except ServiceError as e:
        assert e.service == f"reward at {ADDRESS}" and e.call == "Score"
        return
    assert s.rewards.shape == (b,) and s.rewards.dtype == torch.float32 and bool(torch.isfinite(s.rewards).all())
