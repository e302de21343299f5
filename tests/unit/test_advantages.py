"""GAE, token rewards, group-relative advantages and masked whitening: hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from rl.advantages import gae, group_advantages, masked_whiten, token_rewards

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: {"rtol": 1e-6, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}
NAN, INF = float("nan"), float("inf")

# One 4-token sequence: a small KL-shaped reward on each token, the score 1.0 on the last one.
R = [-0.1, 0.0, 0.2, 1.0]
V = [0.5, 0.6, 0.7, 0.8]


def _gae(rewards, values, mask, dtype, **kw):
    t = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    return gae(t(rewards), t(values), torch.tensor(mask), **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_hand_worked_gamma_09_lambda_08(dtype: torch.dtype) -> None:
    g, gl = 0.9, 0.9 * 0.8
    d3 = R[3] - V[3]  # no bootstrap after the last real token
    d2 = R[2] + g * V[3] - V[2]
    d1 = R[1] + g * V[2] - V[1]
    d0 = R[0] + g * V[1] - V[0]
    adv = [
        d0 + gl * d1 + gl**2 * d2 + gl**3 * d3,
        d1 + gl * d2 + gl**2 * d3,
        d2 + gl * d3,
        d3,
    ]
    out = _gae([R], [V], [[1, 1, 1, 1]], dtype, gamma=0.9, lam=0.8)
    torch.testing.assert_close(out.advantages, torch.tensor([adv], dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(
        out.returns, torch.tensor([adv], dtype=dtype) + torch.tensor([V], dtype=dtype), **TOL[dtype]
    )
    assert out.advantages.dtype == out.returns.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_gamma_1_lambda_1_is_monte_carlo(dtype: torch.dtype) -> None:
    returns = [R[0] + R[1] + R[2] + R[3], R[1] + R[2] + R[3], R[2] + R[3], R[3]]
    out = _gae([R], [V], [[1, 1, 1, 1]], dtype, gamma=1.0, lam=1.0)
    torch.testing.assert_close(out.returns, torch.tensor([returns], dtype=dtype), **TOL[dtype])
    adv = [returns[i] - V[i] for i in range(4)]
    torch.testing.assert_close(out.advantages, torch.tensor([adv], dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_lambda_0_is_td0(dtype: torch.dtype) -> None:
    adv = [R[0] + 0.9 * V[1] - V[0], R[1] + 0.9 * V[2] - V[1], R[2] + 0.9 * V[3] - V[2], R[3] - V[3]]
    out = _gae([R], [V], [[1, 1, 1, 1]], dtype, gamma=0.9, lam=0.0)
    torch.testing.assert_close(out.advantages, torch.tensor([adv], dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_one_token_answer(dtype: torch.dtype) -> None:
    out = _gae([[2.0, NAN, 7.0, INF]], [[0.25, INF, NAN, 3.0]], [[1, 0, 0, 0]], dtype, gamma=0.9, lam=0.8)
    torch.testing.assert_close(
        out.advantages, torch.tensor([[2.0 - 0.25, 0, 0, 0]], dtype=dtype), **TOL[dtype]
    )
    torch.testing.assert_close(out.returns, torch.tensor([[2.0, 0, 0, 0]], dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_right_padding_with_junk(dtype: torch.dtype) -> None:
    rewards = [R, [0.3, 1.0, NAN, -INF], [NAN, INF, 1.0, 2.0]]
    values = [V, [0.4, 0.9, INF, NAN], [1.0, NAN, -INF, 5.0]]
    mask = [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]
    out = _gae(rewards, values, mask, dtype, gamma=0.9, lam=0.8)
    alone = _gae([R], [V], [[1, 1, 1, 1]], dtype, gamma=0.9, lam=0.8)
    d1 = 1.0 - 0.9
    d0 = 0.3 + 0.9 * 0.9 - 0.4
    expected_row1 = [d0 + 0.9 * 0.8 * d1, d1, 0.0, 0.0]
    torch.testing.assert_close(out.advantages[0], alone.advantages[0], **TOL[dtype])
    torch.testing.assert_close(out.advantages[1], torch.tensor(expected_row1, dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(
        out.returns[1], torch.tensor([expected_row1[0] + 0.4, d1 + 0.9, 0, 0], dtype=dtype), **TOL[dtype]
    )
    assert torch.equal(out.advantages[2], torch.zeros(4, dtype=dtype))
    assert torch.equal(out.returns[2], torch.zeros(4, dtype=dtype))


def _gae_loop(rewards, values, lengths, gamma, lam):
    """Plain Python GAE, one sequence at a time, on lists of floats."""
    advantages = []
    for r, v, n in zip(rewards, values, lengths, strict=True):
        row, running = [0.0] * len(r), 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            row[t] = running
        advantages.append(row)
    return advantages


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_plain_loop(dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    lengths = [0, 1, 2, 5, 9, 9, 3]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    rewards = torch.randn(7, 9, dtype=torch.float64, generator=gen)
    values = torch.randn(7, 9, dtype=torch.float64, generator=gen)
    gamma, lam = 0.5 + 0.5 * float(torch.rand(1, generator=gen)), 0.95
    expected = _gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    junk = torch.where(mask, 0.0, NAN)
    out = gae((rewards + junk).to(dtype), (values - junk).to(dtype), mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(out.advantages, torch.tensor(expected, dtype=dtype), **TOL[dtype])


def test_gae_outputs_carry_no_gradient() -> None:
    values = torch.tensor([V], requires_grad=True)
    rewards = torch.tensor([R], requires_grad=True)
    out = gae(rewards, values, torch.ones(1, 4), gamma=0.9, lam=0.8)
    assert not out.advantages.requires_grad
    assert not out.returns.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_rewards_score_on_last_token_minus_kl(dtype: torch.dtype) -> None:
    scores = torch.tensor([2.0, 3.0, 5.0], dtype=dtype)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, NAN, INF], [NAN, NAN, NAN]], dtype=dtype)
    out = token_rewards(scores, mask, kl=kl, kl_coef=0.5)
    expected = [[-0.5 * 0.1, -0.5 * 0.2, 2.0 - 0.5 * 0.3], [3.0 - 0.5 * 0.4, 0.0, 0.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_advantages_binary_rewards(dtype: torch.dtype) -> None:
    eps = 1e-4
    rewards = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0], dtype=dtype)
    out = group_advantages(rewards, 4, scale="group", eps=eps)
    assert torch.equal(out[:8], torch.zeros(8, dtype=dtype))  # all-0 and all-1 groups: exactly 0
    # [1, 0, 0, 0]: mean 1/4, Bessel std sqrt((3/4)^2 + 3 (1/4)^2) / 3) = 1/2
    # [1, 1, 0, 0]: mean 1/2, Bessel std sqrt(4 (1/2)^2 / 3) = sqrt(1/3)
    s1, s2 = 0.5 + eps, math.sqrt(1 / 3) + eps
    expected = [0.75 / s1, -0.25 / s1, -0.25 / s1, -0.25 / s1, 0.5 / s2, 0.5 / s2, -0.5 / s2, -0.5 / s2]
    torch.testing.assert_close(out[8:], torch.tensor(expected, dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_of_two(dtype: torch.dtype) -> None:
    # mean 2, Bessel std sqrt((1 + 1) / 1) = sqrt(2)
    out = group_advantages(torch.tensor([3.0, 1.0], dtype=dtype), 2, eps=1e-4)
    s = math.sqrt(2.0) + 1e-4
    torch.testing.assert_close(out, torch.tensor([1 / s, -1 / s], dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_of_one_is_zero_never_nan(scale: str) -> None:
    assert torch.equal(group_advantages(torch.tensor([0.3, 1.0, -2.0]), 1, scale=scale), torch.zeros(3))
    assert torch.equal(group_advantages(torch.tensor([0.7]), 1, scale=scale), torch.zeros(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_group_is_exactly_zero(scale: str, dtype: torch.dtype) -> None:
    # 0.1 is not a binary fraction: in both dtypes 0.1 - mean(seven copies of 0.1) is not 0.
    rewards = torch.tensor([0.1] * 7 + [0.7, 0.2, 0.4, 0.1, 0.0, 1.0, 0.5], dtype=dtype)
    assert bool((rewards[:7] - rewards[:7].mean() != 0).all())
    out = group_advantages(rewards, 7, scale=scale)
    assert torch.equal(out[:7], torch.zeros(7, dtype=dtype))
    assert bool((out[7:] != 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_scale_modes(dtype: torch.dtype) -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 3.0, 0.0], dtype=dtype)
    eps = 1e-4
    # group means 1/2, 1, 3/2; centred [1/2, -1/2, 0, 0, 3/2, -3/2]
    centred = [0.5, -0.5, 0.0, 0.0, 1.5, -1.5]
    none = group_advantages(rewards, 2, scale="none", eps=eps)
    torch.testing.assert_close(none, torch.tensor(centred, dtype=dtype), **TOL[dtype])
    # group Bessel stds: sqrt(1/2), 0, sqrt(9/2)
    stds = [math.sqrt(0.5)] * 2 + [0.0] * 2 + [math.sqrt(4.5)] * 2
    group = group_advantages(rewards, 2, scale="group", eps=eps)
    torch.testing.assert_close(
        group,
        torch.tensor([c / (s + eps) for c, s in zip(centred, stds, strict=False)], dtype=dtype),
        **TOL[dtype],
    )
    # batch: mean 1, Bessel variance (0 + 1 + 0 + 0 + 4 + 1) / 5 = 6/5 over all six rewards
    batch_std = math.sqrt(6 / 5)
    batch = group_advantages(rewards, 2, scale="batch", eps=eps)
    torch.testing.assert_close(
        batch, torch.tensor([c / (batch_std + eps) for c in centred], dtype=dtype), **TOL[dtype]
    )


def test_group_advantages_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="'group', 'batch', 'none'"):
        group_advantages(torch.zeros(4), 2, scale="rank")  # type: ignore[arg-type]


def test_group_advantages_integer_rewards_and_no_gradient() -> None:
    out = group_advantages(torch.tensor([1, 0]), 2, scale="none")
    assert out.dtype == torch.get_default_dtype()
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    assert not group_advantages(rewards, 2).requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_whiten_hand_values(dtype: torch.dtype) -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, INF, -INF, 0.0]], dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # real tokens 1, 2, 3, 4: mean 5/2, Bessel variance (9/4 + 1/4 + 1/4 + 9/4) / 3 = 5/3
    s = math.sqrt(5 / 3 + 1e-8)
    expected = [[-1.5 / s, -0.5 / s, 0.5 / s, 0.0], [1.5 / s, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor(expected, dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_whiten_constant_and_single_token_give_zero(dtype: torch.dtype) -> None:
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # seven real tokens of 0.1, as above
    x = torch.where(mask.bool(), 0.1, NAN).to(dtype)
    assert torch.equal(masked_whiten(x, mask), torch.zeros(2, 5, dtype=dtype))
    single = masked_whiten(torch.tensor([[NAN, 3.0]]), torch.tensor([[0, 1]]))
    assert torch.equal(single, torch.zeros(1, 2))
    assert torch.equal(masked_whiten(torch.full((2, 2), NAN), torch.zeros(2, 2)), torch.zeros(2, 2))


def test_kl_penalised_scores_sums_real_tokens_only():
    from rl.advantages import kl_penalised_scores, token_rewards

    scores = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.1, 0.2, float("nan")], [0.5, float("inf"), 3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = kl_penalised_scores(scores, kl, mask, kl_coef=0.5)
    assert torch.allclose(out, torch.tensor([1.0 - 0.5 * 0.3, -0.5 * 0.5]), atol=1e-7)
    # The same number as the token rewards GAE sees, summed over each row.
    assert torch.allclose(token_rewards(scores, mask, kl=kl, kl_coef=0.5).sum(dim=1), out, atol=1e-7)
