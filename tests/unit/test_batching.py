"""services.common.batching: micro-batch planning, right padding, mapping back to response rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.batching import (
    CallGate,
    check_sequences,
    micro_batches,
    pad_micro_batch,
    plan_micro_batches,
    unbatch,
)
from services.common.codec import RaggedTensor
from services.common.errors import InvalidArgument, OutOfRange, Overloaded


def test_plan_hand_worked() -> None:
    # Longest first: 5 alone (5 + 4 padded to 2 x 5 = 10 > 9), then 4 + 3 (2 x 4 = 8), then 2 + 1.
    assert plan_micro_batches([3, 5, 1, 4, 2], 9) == [[1], [3, 0], [4, 2]]


def test_plan_max_rows() -> None:
    assert plan_micro_batches([2, 2, 2, 2, 2], 100, max_rows=2) == [[0, 1], [2, 3], [4]]


def test_plan_rejects_row_over_budget() -> None:
    with pytest.raises(ValueError, match="budget"):
        plan_micro_batches([3, 11], 10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(40, 200))
def test_plan_property(lengths: list[int], budget: int) -> None:
    groups = plan_micro_batches(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= budget
        assert lengths[g[0]] == max(lengths[i] for i in g)


def test_pad_hand_worked() -> None:
    rows = [torch.tensor([7, 8, 9]), torch.tensor([4, 5, 6, 1, 2])]
    mb = pad_micro_batch(rows, [1, 3], [1, 0], pad_id=0)
    assert mb.index.tolist() == [1, 0]
    assert mb.input_ids.tolist() == [[4, 5, 6, 1, 2], [7, 8, 9, 0, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]
    # Row 1 (start 3, len 5): response tokens 3, 4 read at positions 2, 3.
    # Row 0 (start 1, len 3): response tokens 1, 2 read at positions 0, 1.
    assert mb.response_positions.tolist() == [[2, 3], [0, 1]]
    assert mb.response_mask.tolist() == [[1, 1], [1, 1]]
    per_position = torch.arange(10, dtype=torch.float32).view(2, 5)
    assert [r.tolist() for r in mb.response_rows(per_position)] == [[2.0, 3.0], [5.0, 6.0]]
    assert mb.pad_responses([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]).tolist() == [[3, 4], [1, 2]]


def test_pad_empty_response_and_trailing_dims() -> None:
    rows = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6])]
    mb = pad_micro_batch(rows, [2, 2], [0, 1])
    assert mb.response_mask.tolist() == [[1, 1], [0, 0]]
    per_position = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    got = mb.response_rows(per_position)
    assert torch.equal(got[0], per_position[0, 1:3])
    assert got[1].shape == (0, 3)


def _causal_fake_model(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """A causal per-position function of ids and positions: out[p] = sum_{q<=p} ids[q] * (pos[q] + 1)."""
    return torch.cumsum(input_ids.double() * (position_ids.double() + 1), dim=1)


def test_mapping_back_equals_unbatched() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [3, 9, 1, 6, 6, 12, 2]
    rows = [torch.randint(1, 50, (n,), generator=g) for n in lengths]
    starts = [1, 4, 1, 6, 2, 11, 1]
    mbs = micro_batches(rows, starts, 14, pad_id=0)
    assert len(mbs) > 3 and all(mb.num_tokens <= 14 for mb in mbs)
    pieces = [(mb, mb.response_rows(_causal_fake_model(mb.input_ids, mb.position_ids))) for mb in mbs]
    got = unbatch(pieces, len(rows))
    for row, start, out in zip(rows, starts, got, strict=True):
        alone = _causal_fake_model(row.unsqueeze(0), torch.arange(row.numel()).unsqueeze(0))[0]
        assert out.shape == (row.numel() - start,)
        assert torch.equal(out, alone[start - 1 : row.numel() - 1])


def test_unbatch_reports_missing_rows() -> None:
    mb = pad_micro_batch([torch.tensor([1, 2])], [1], [0])
    with pytest.raises(ValueError, match=r"\[1\]"):
        unbatch([(mb, [torch.zeros(1)])], 2)


def _check(rows, starts, **kw):
    limits = {"vocab_size": 10, "max_sequences": 4, "max_tokens": 20, "max_row_tokens": 8}
    limits.update(kw)
    return check_sequences(rows, starts, **limits)


def test_check_accepts_ragged_and_lists() -> None:
    rows, starts = _check(RaggedTensor.from_rows([[1, 2, 3], [4]], dtype=torch.int32), [3, 1])
    assert [r.tolist() for r in rows] == [[1, 2, 3], [4]] and rows[0].dtype == torch.int64
    assert starts == [3, 1]


@pytest.mark.parametrize(
    ("rows", "starts", "error", "words"),
    [
        ([], [], InvalidArgument, ["sequences.token_ids", "empty"]),
        ([[1, 2]] * 5, [1] * 5, InvalidArgument, ["max_batch_sequences=4"]),
        ([[1, 2], [3]], [1], InvalidArgument, ["sequences.response_start", "1 entries for 2"]),
        ([[1] * 8, [1] * 8, [1] * 8], [1, 1, 1], InvalidArgument, ["max_tokens_per_call=20"]),
        ([[1] * 9], [1], InvalidArgument, ["sequences.token_ids", "limit of 8"]),
        ([[1, 2]], [0], InvalidArgument, ["sequences.response_start", "row 0", "[1, 2]"]),
        ([[1, 2], [1, 2]], [1, 3], InvalidArgument, ["sequences.response_start", "row 1"]),
        ([[]], [1], InvalidArgument, ["sequences.response_start", "[1, 0]"]),
        ([[1, 10]], [1], OutOfRange, ["sequences.token_ids", "token id 10", "vocab_size=10"]),
        ([[1, -1]], [1], OutOfRange, ["sequences.token_ids", "token id -1"]),
    ],
)
def test_check_rejects(rows, starts, error, words) -> None:
    with pytest.raises(error) as info:
        _check(rows, starts)
    for w in words:
        assert w in str(info.value)


def test_check_rejects_float_ids() -> None:
    with pytest.raises(InvalidArgument, match="integers"):
        _check([torch.tensor([1.0, 2.0])], [1])


def test_call_gate_refuses_beyond_limit_and_recovers() -> None:
    gate = CallGate(2, "test")
    with gate.enter(), gate.enter(), pytest.raises(Overloaded, match="max_concurrent=2"), gate.enter():
        pass
    with gate.enter():  # both slots were released
        pass
