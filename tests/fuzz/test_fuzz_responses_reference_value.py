"""Fuzz the orchestrator's checks of what the reference and the value services answer (LogProbs,
Values, TrainStep; orchestrator/remote/clients.py). The generator's and the reward's answers are
fuzzed in test_fuzz_responses.py, which says how (tests/fuzz/answering.py holds the shared stub).

A well-formed answer is decoded exactly; one with a hostile defect (wrong counts or row lengths,
non-finite values, positive log-probabilities, impossible scalars) raises ServiceError naming the
service, the call and the field; arbitrary bytes raise ServiceError or pass every check.

Shapes: B sequences, each with 1..6 response tokens.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.remote.clients import ReferenceClient, ServiceError, ValueClient
from quartet.v1 import common_pb2 as pb
from quartet.v1 import reference_pb2, value_pb2
from tests.fuzz.answering import ADDRESS, FLOAT16_OVERFLOW, RESPONSES, answering, arbitrary_ragged, refused
from tests.fuzz.strategies import INT64_MAX, NON_FINITE, broken_ragged, ragged

pytestmark = FLOAT16_OVERFLOW


# ---- LogProbs and Values -------------------------------------------------------------------------

ROWS = {"reference": (ReferenceClient, "LogProbs", "logprobs"), "value": (ValueClient, "Values", "values")}


def _per_token(role: str, lengths: list[int], msg: pb.Ragged) -> list[torch.Tensor]:
    kind = ROWS[role][0]
    prompts, completions = [[1]] * len(lengths), [[3] * k for k in lengths]
    if role == "value":
        return answering(kind, value_pb2.ValuesResponse(values=msg)).values(prompts, completions)
    return answering(kind, reference_pb2.LogProbsResponse(logprobs=msg)).logprobs(prompts, completions)


@st.composite
def token_values(draw: st.DrawFn, role: str) -> list[list[float]]:
    """[B] rows (1..6 tokens) of finite float32 values; log-probabilities (<= 0) for the reference."""
    high = 0.0 if role == "reference" else 1e6
    value = st.floats(-1e6, high, width=32)
    return draw(st.lists(st.lists(value, min_size=1, max_size=6), min_size=1, max_size=6))


@pytest.mark.parametrize("role", list(ROWS))
@given(data=st.data())
@RESPONSES
def test_a_good_per_token_answer_is_decoded_exactly(role: str, data: st.DataObject) -> None:
    rows = data.draw(token_values(role))
    got = _per_token(role, [len(r) for r in rows], ragged(rows, pb.DTYPE_FLOAT32))
    assert [g.tolist() for g in got] == rows and all(g.dtype == torch.float32 for g in got)


@pytest.mark.parametrize("role", list(ROWS))
@given(defect=st.sampled_from(["ragged", "count", "lengths", "nonfinite", "positive"]), data=st.data())
@RESPONSES
def test_a_hostile_per_token_answer_is_refused(role: str, defect: str, data: st.DataObject) -> None:
    _, rpc, field = ROWS[role]
    draw = data.draw
    rows = draw(token_values(role))
    lengths = [len(r) for r in rows]
    if defect == "positive" and role == "value":
        defect = "nonfinite"  # a value may be positive; only a log-probability may not
    msg = None
    if defect == "ragged":
        msg = draw(broken_ragged(rows, allowed=(pb.DTYPE_FLOAT32,), field=field)).request
    elif defect == "count":
        rows = [*rows, [-1.0]] if draw(st.booleans()) or len(rows) == 1 else rows[:-1]
    elif defect == "lengths":
        row = draw(st.integers(0, len(rows) - 1))
        rows[row] = rows[row] + [-1.0] if draw(st.booleans()) or len(rows[row]) == 1 else rows[row][:-1]
    else:
        row = draw(st.integers(0, len(rows) - 1))
        bad = draw(st.sampled_from(NON_FINITE)) if defect == "nonfinite" else draw(st.floats(2**-9, 2**99, width=32))
        rows[row][draw(st.integers(0, len(rows[row]) - 1))] = bad
    msg = msg or ragged(rows, pb.DTYPE_FLOAT32)
    refused(lambda: _per_token(role, lengths, msg), service=role, rpc=rpc, field=field, why=defect)


# ---- TrainStep -----------------------------------------------------------------------------------


def _train(response: Any) -> Any:
    client = answering(ValueClient, response)
    one = [torch.zeros(2)]
    return client.train_step([[1]], [[2, 3]], returns=one, old_values=one, mask=None, clip_range=0.2, step_id=5)


good_train = st.fixed_dictionaries({
    "loss": st.floats(0, 1e6, width=32), "clip_fraction": st.floats(0, 1, width=32),
    "explained_variance": st.one_of(st.floats(-1e6, 1, width=32), st.just(math.nan)),
    "grad_norm": st.floats(0, 1e6, width=32), "steps_trained": st.integers(0, INT64_MAX),
    "last_step_id": st.integers(-1, INT64_MAX), "duplicate": st.booleans(),
})

HOSTILE_SCALARS = {
    "loss": st.sampled_from(NON_FINITE),
    "clip_fraction": st.one_of(st.sampled_from(NON_FINITE), st.floats(-(2**99), -(2**-9), width=32),
                               st.floats(1 + 2**-7, 2**99, width=32)),
    "explained_variance": st.sampled_from([math.inf, -math.inf]),
    "grad_norm": st.one_of(st.sampled_from(NON_FINITE), st.floats(-(2**99), -(2**-9), width=32)),
    "steps_trained": st.integers(-INT64_MAX - 1, -1),
    "last_step_id": st.integers(-INT64_MAX - 1, -2),
}


@given(good_train)
@RESPONSES
def test_a_good_train_step_answer_is_accepted(fields: dict[str, Any]) -> None:
    got = _train(value_pb2.TrainStepResponse(**fields))
    assert (got.steps_trained, got.last_step_id, got.duplicate) == (
        fields["steps_trained"], fields["last_step_id"], fields["duplicate"])


@given(good_train, st.sampled_from(sorted(HOSTILE_SCALARS)), st.data())
@RESPONSES
def test_a_hostile_train_step_answer_is_refused(fields: dict[str, Any], field: str, data: st.DataObject) -> None:
    fields[field] = data.draw(HOSTILE_SCALARS[field])
    refused(lambda: _train(value_pb2.TrainStepResponse(**fields)), service="value", rpc="TrainStep", field=field,
             why=f"{field}={fields[field]}")


# ---- arbitrary bytes: ServiceError or a response that passes every check, nothing else -----------


@pytest.mark.parametrize("role", list(ROWS))
@given(msg=arbitrary_ragged, lengths=st.lists(st.integers(1, 4), min_size=1, max_size=4))
@RESPONSES
def test_arbitrary_per_token_bytes_raise_service_error_or_pass_every_check(
        role: str, msg: pb.Ragged, lengths: list[int]) -> None:
    try:
        rows = _per_token(role, lengths, msg)
    except ServiceError as e:
        assert e.service == f"{role} at {ADDRESS}" and e.call == ROWS[role][1]
        return
    assert [len(r) for r in rows] == lengths and all(bool(torch.isfinite(r).all()) for r in rows)
