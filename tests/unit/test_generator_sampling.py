"""The generator's token sampler and request validation, without a model."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import InvalidArgument, OutOfRange
from services.generator.backend import (
    BackendInfo,
    GenerationRequest,
    Limits,
    SamplingParams,
    completes_stop,
    sample_seed,
    stop_string_end,
    validate_request,
)
from services.generator.transformers_backend import sample_tokens

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.0])  # ranks: 0, then 1 and 5 tied, 2, 3, 4


def _draw(rows: int, *, temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> torch.Tensor:
    u = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(sample_seed(seed, 0, j)))
                     for j in range(rows)])
    return sample_tokens(LOGITS.expand(rows, -1).clone(), torch.full((rows,), temperature),
                         torch.full((rows,), top_k), torch.full((rows,), top_p), u)


def test_greedy_is_argmax() -> None:
    assert _draw(5, temperature=0.0).tolist() == [0] * 5


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-6])
def test_tiny_temperature_tends_to_greedy(temperature: float) -> None:
    # 1e-45 is a valid float32 > 0: dividing raw logits by it overflows unless the max is taken out first
    assert _draw(50, temperature=temperature).tolist() == [0] * 50
    assert _draw(50, temperature=temperature, top_k=3, top_p=0.9).tolist() == [0] * 50


def test_frequencies_follow_softmax_over_temperature() -> None:
    n = 20000
    counts = torch.bincount(_draw(n, temperature=0.7), minlength=6).float() / n
    want = torch.softmax(LOGITS / 0.7, -1)
    # 4 binomial standard errors at n = 20000 is < 0.015 for every p here
    assert torch.allclose(counts, want, atol=0.015), (counts, want)


def test_top_k_and_top_p_restrict_the_support() -> None:
    assert set(_draw(2000, temperature=1.0, top_k=1).tolist()) == {0}
    assert set(_draw(2000, temperature=1.0, top_k=2).tolist()) == {0, 1}  # stable sort: the earlier of the tie
    probs = torch.softmax(LOGITS, -1)
    p0 = float(probs[0])
    assert set(_draw(2000, temperature=1.0, top_p=p0 * 0.99).tolist()) == {0}  # only the top token reaches p
    counts = torch.bincount(_draw(20000, temperature=1.0, top_p=0.75), minlength=6).float() / 20000
    # 0.75 of mass needs the top three tokens (0, 1, 5); renormalised among them
    keep = torch.tensor([0, 1, 5])
    want = torch.zeros(6)
    want[keep] = probs[keep] / probs[keep].sum()
    assert torch.allclose(counts, want, atol=0.015), (counts, want)


def test_rows_draw_from_their_own_generators() -> None:
    a = _draw(8, temperature=1.0, seed=3)
    b = _draw(8, temperature=1.0, seed=3)
    c = _draw(8, temperature=1.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a row's token does not depend on the other rows of the batch
    u = torch.rand((1,), generator=torch.Generator().manual_seed(sample_seed(3, 0, 5)))
    alone = sample_tokens(LOGITS[None].clone(), torch.ones(1), torch.zeros(1, dtype=torch.int64), torch.ones(1), u)
    assert int(alone) == int(a[5])


def test_mixed_batch_greedy_plain_and_filtered_rows() -> None:
    logits = LOGITS.expand(3, -1).clone()
    u = torch.tensor([0.99, 0.99, 0.99])
    out = sample_tokens(logits, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 0, 1]), torch.ones(3), u)
    assert out[0] == 0 and out[2] == 0  # greedy; top-1
    assert out[1] == 5  # u near 1 inverts the unsorted CDF at its last token


def test_sample_seed_separates_prompt_and_sample_indices() -> None:
    seeds = {sample_seed(1, i, j) for i in range(10) for j in range(10)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3) != sample_seed(2, 2, 3)


INFO = BackendInfo(backend="x", model_path="m", tokenizer_fingerprint="f", vocab_size=50, dtype="float32",
                   device="cpu", eos_token_ids=(2,), max_positions=64)
LIMITS = Limits(max_prompts=4, max_samples_per_prompt=8, max_new_tokens=16, max_batch_sequences=16,
                max_tokens_per_call=400)


@pytest.mark.parametrize(("prompts", "params", "exc", "field"), [
    ([], SamplingParams(), InvalidArgument, "prompt_ids"),
    ([[1, 2], []], SamplingParams(), InvalidArgument, "prompt_ids[1]"),
    ([[1, 50]], SamplingParams(), OutOfRange, "prompt_ids[0]"),
    ([[-1]], SamplingParams(), OutOfRange, "prompt_ids[0]"),
    ([[1]] * 5, SamplingParams(), OutOfRange, "prompt_ids"),
    ([[1]], SamplingParams(n=0), InvalidArgument, "params.n"),
    ([[1]], SamplingParams(n=9), OutOfRange, "params.n"),
    ([[1]] * 3, SamplingParams(n=8), OutOfRange, "params.n"),
    ([[1]], SamplingParams(max_new_tokens=0), InvalidArgument, "params.max_new_tokens"),
    ([[1]], SamplingParams(max_new_tokens=17), OutOfRange, "params.max_new_tokens"),
    ([[1]], SamplingParams(temperature=-0.1), InvalidArgument, "params.temperature"),
    ([[1]], SamplingParams(temperature=float("nan")), InvalidArgument, "params.temperature"),
    ([[1]], SamplingParams(top_p=1.5), InvalidArgument, "params.top_p"),
    ([[1]], SamplingParams(top_p=0.0), InvalidArgument, "params.top_p"),
    ([[1]], SamplingParams(top_k=-1), InvalidArgument, "params.top_k"),
    ([[1]], SamplingParams(stop_token_ids=(50,)), OutOfRange, "params.stop_token_ids"),
    ([[1]], SamplingParams(stop=("",)), InvalidArgument, "params.stop[0]"),
    ([[1]], SamplingParams(stop=("ok", "x" * 201)), InvalidArgument, "params.stop[1]"),
    ([[1]], SamplingParams(stop=("a",) * 17), InvalidArgument, "params.stop"),
    ([[1] * 60], SamplingParams(max_new_tokens=5), OutOfRange, "prompt_ids[0]"),
    ([[1] * 40] * 2, SamplingParams(n=4, max_new_tokens=16), OutOfRange, "prompt_ids"),
])
def test_validation_names_the_field(prompts, params, exc, field) -> None:
    with pytest.raises(exc) as info:
        validate_request(GenerationRequest(prompts, params), LIMITS, INFO)
    assert info.value.field == field


def test_valid_request_passes() -> None:
    validate_request(GenerationRequest([[1, 2], [3]], SamplingParams(n=8, max_new_tokens=16, top_p=0.5, top_k=3)),
                     LIMITS, INFO)


# Stop strings: a toy vocabulary whose tokens span several characters, decoded by concatenation.
PIECES = ["The", " answer", " is", " 4", ".\n", "\n", "Q", "\n\n"]


def _decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


@pytest.mark.parametrize(("stop", "end"), [
    (("\n\n",), 6),           # ".\n" then "\n": completed by token 5, across two tokens
    (("is 4",), 4),           # " is" + " 4"
    (("swe",), 2),            # inside one token
    ((" answer is",), 3),
    (("Q", "is"), 3),         # the first stop string completed wins, whichever is listed first
    (("nowhere",), None),
])
def test_stop_string_end_by_hand(stop: tuple[str, ...], end: int | None) -> None:
    ids = [0, 1, 2, 3, 4, 5, 6]  # "The answer is 4.\n\nQ"
    assert stop_string_end(ids, stop, _decode) == end
    if end is not None:
        assert completes_stop(ids[:end], stop, _decode) and not completes_stop(ids[:end - 1], stop, _decode)


def test_a_stop_string_already_in_the_text_is_not_completed_again() -> None:
    # "\n\n" is in ".\n" + "\n" (tokens 4-5); token 6 ("Q") does not complete it a second time
    assert not completes_stop([4, 5, 6], ("\n\n",), _decode)
    assert completes_stop([6, 7], ("\n\n",), _decode)  # one token holding the whole stop string
