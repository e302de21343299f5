"""Truncated importance weights (rl/offpolicy.py) and their use in the policy losses, against hand numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rl.losses import grpo_loss, policy_loss, trpo_surrogate
from rl.offpolicy import truncated_is_weights

NAN = float("nan")


def _batch():
    prox = torch.tensor([[math.log(0.6), math.log(0.2), math.log(0.9)], [math.log(0.1), NAN, NAN]])
    beh = torch.tensor([[math.log(0.4), math.log(0.4), math.log(0.3)], [math.log(0.08), NAN, NAN]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return prox, beh, mask


def test_weights_by_hand() -> None:
    prox, beh, mask = _batch()
    out = truncated_is_weights(prox, beh, mask, cap=2.0)
    # ratios 0.6/0.4 = 1.5, 0.2/0.4 = 0.5, 0.9/0.3 = 3 -> cut to 2; 0.1/0.08 = 1.25; padding 0.
    assert out.weights == pytest.approx(torch.tensor([[1.5, 0.5, 2.0], [1.25, 0.0, 0.0]]), abs=1e-6)
    assert float(out.mean) == pytest.approx((1.5 + 0.5 + 2.0 + 1.25) / 4, abs=1e-6)
    assert float(out.truncated_fraction) == pytest.approx(0.25)
    assert not out.weights.requires_grad


def test_cap_must_be_positive() -> None:
    prox, beh, mask = _batch()
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(prox, beh, mask, cap=0.0)


def test_untruncated_weights_turn_a_mu_expectation_into_a_pi_expectation() -> None:
    # A second formulation: over all outcomes of a categorical, sum_a mu(a) w(a) A(a) = sum_a pi(a) A(a).
    pi = torch.tensor([0.5, 0.3, 0.2])
    mu = torch.tensor([0.2, 0.2, 0.6])
    adv = torch.tensor([1.0, -2.0, 3.0])
    w = truncated_is_weights(pi.log()[None], mu.log()[None], torch.ones(1, 3), cap=1e9).weights[0]
    assert float((mu * w * adv).sum()) == pytest.approx(float((pi * adv).sum()), abs=1e-6)


def test_policy_loss_weights_each_token_and_padding_stays_out() -> None:
    prox, beh, mask = _batch()
    w = truncated_is_weights(prox, beh, mask, cap=2.0).weights
    adv = torch.tensor([[1.0, -1.0, 2.0], [0.5, NAN, NAN]])
    logprobs = prox.clone().requires_grad_(True)  # ratio 1 everywhere: no clipping
    out = policy_loss(logprobs, prox, adv, mask, is_weights=w, aggregation="token_mean")
    # -(1 * 1.5 - 1 * 0.5 + 2 * 2 + 0.5 * 1.25) / 4 real tokens
    assert float(out.loss.detach()) == pytest.approx(-5.625 / 4, abs=1e-6)
    out.loss.backward()
    expected = torch.tensor([[-1.5, 0.5, -4.0], [-0.625, 0.0, 0.0]]) / 4  # d/dlogp (-A w r) at r = 1
    assert logprobs.grad == pytest.approx(expected, abs=1e-6)
    assert torch.isfinite(logprobs.grad).all()


def test_weights_of_one_change_nothing() -> None:
    prox, _, mask = _batch()
    torch.manual_seed(0)
    logprobs = prox + 0.3 * torch.randn_like(prox)
    adv = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.0, 0.0]])
    ones = torch.ones_like(mask)
    for kwargs in ({}, {"dual_clip": 3.0}):
        a = policy_loss(logprobs, prox, adv, mask, **kwargs)
        b = policy_loss(logprobs, prox, adv, mask, is_weights=ones, **kwargs)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.clipfrac, b.clipfrac)
    ref = prox - 0.1
    a = grpo_loss(logprobs, prox, ref, adv, mask)
    b = grpo_loss(logprobs, prox, ref, adv, mask, is_weights=ones)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(trpo_surrogate(logprobs, prox, adv, mask),
                       trpo_surrogate(logprobs, prox, adv, mask, is_weights=ones))


def test_grpo_weights_scale_the_surrogate_not_the_kl() -> None:
    prox, beh, mask = _batch()
    w = truncated_is_weights(prox, beh, mask, cap=2.0).weights
    adv = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.0, 0.0]])
    ref = prox - 0.2
    plain = grpo_loss(prox, prox, ref, adv, mask, beta=0.1, aggregation="token_mean")
    weighted = grpo_loss(prox, prox, ref, adv, mask, beta=0.1, aggregation="token_mean", is_weights=w)
    assert torch.equal(plain.kl, weighted.kl)
    assert float(weighted.policy_loss) == pytest.approx(-5.625 / 4, abs=1e-6)
    assert float(weighted.loss) == pytest.approx(float(weighted.policy_loss) + 0.1 * float(plain.kl), abs=1e-6)
