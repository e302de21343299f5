"""KL estimators k1, k2, k3 (Schulman 2020): hand values, padding, gradients, unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

from rl.kl import kl_estimate

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: {"rtol": 1e-6, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", DTYPES)
def test_hand_values_with_junk_padding(dtype: torch.dtype) -> None:
    # Row 0: π = 1/2, π_ref = 1/4 then π = 1/4, π_ref = 1/2. Row 1: one real token, junk after it.
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.1), NAN]], dtype=dtype)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)], [math.log(0.1), INF]], dtype=dtype)
    mask = torch.tensor([[1, 1], [1, 0]])
    log2 = math.log(2.0)
    expected = {
        # log π - log π_ref
        "k1": [[log2, -log2], [0.0, 0.0]],
        # (log π - log π_ref)^2 / 2
        "k2": [[log2**2 / 2, log2**2 / 2], [0.0, 0.0]],
        # π_ref/π - log(π_ref/π) - 1
        "k3": [[0.5 - (-log2) - 1, 2.0 - log2 - 1], [0.0, 0.0]],
    }
    for kind, per_token in expected.items():
        out = kl_estimate(logprobs, ref, mask, kind)
        want = torch.tensor(per_token, dtype=dtype)
        torch.testing.assert_close(out.per_token, want, **TOL[dtype])
        torch.testing.assert_close(out.mean, want.sum() / 3, **TOL[dtype])
        assert out.per_token.dtype == dtype


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_exactly_zero_at_equal_inputs(kind: str) -> None:
    logprobs = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) - 3.0
    out = kl_estimate(logprobs, logprobs.clone(), torch.ones(4, 7), kind)
    assert torch.equal(out.per_token, torch.zeros_like(logprobs))
    assert out.mean.item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_k3_is_nonnegative(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    # Tiny differences (where exp(d) - d - 1 cancels) as well as large ones.
    scales = torch.tensor([1e-8, 1e-6, 1e-4, 1e-2, 1.0, 10.0], dtype=dtype)
    logprobs = torch.randn(6, 1000, dtype=dtype, generator=gen) * 3.0
    ref = logprobs + torch.randn(6, 1000, dtype=dtype, generator=gen) * scales[:, None]
    per_token = kl_estimate(logprobs, ref, torch.ones(6, 1000), "k3").per_token
    assert bool((per_token >= 0).all())


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_gradient_only_through_logprobs_and_zero_at_padding(kind: str) -> None:
    logprobs = torch.tensor([[-1.0, -2.0, NAN]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, INF]], dtype=torch.float64, requires_grad=True)
    kl_estimate(logprobs, ref, torch.tensor([[1, 1, 0]]), kind).mean.backward()
    assert ref.grad is None
    assert logprobs.grad is not None
    assert bool(torch.isfinite(logprobs.grad).all())
    assert logprobs.grad[0, 2].item() == 0.0
    assert bool((logprobs.grad[0, :2] != 0).all())


def test_all_padding_gives_zero_not_nan() -> None:
    out = kl_estimate(torch.full((2, 3), NAN), torch.full((2, 3), INF), torch.zeros(2, 3), "k3")
    assert torch.equal(out.per_token, torch.zeros(2, 3))
    assert out.mean.item() == 0.0


def test_unknown_kind_names_the_choices() -> None:
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "k4")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_for_kl_policy_to_reference() -> None:
    """Sample tokens from π, estimate KL(π || π_ref) by the mean of k1 and k3, compare with the exact
    KL. Tolerance: 4 standard errors of each sample mean (a false failure has probability ~6e-5)."""
    policy = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    reference = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)
    exact = float((policy * (policy.log() - reference.log())).sum())  # ≈ 0.534
    n = 200_000
    tokens = torch.multinomial(policy, n, replacement=True, generator=torch.Generator().manual_seed(1234))
    logprobs, ref = policy.log()[tokens][None, :], reference.log()[tokens][None, :]
    for kind in ("k1", "k3"):
        out = kl_estimate(logprobs, ref, torch.ones(1, n), kind)
        standard_error = float(out.per_token.std()) / math.sqrt(n)
        assert abs(float(out.mean) - exact) < 4 * standard_error, kind
        assert standard_error < 0.01 * exact  # the test can tell a biased estimator apart
    # The same bound tells biased estimators apart: E[k2] ≈ 0.742 here, and the reverse KL(π_ref || π)
    # ≈ 0.412 (what k3 with the ratio inverted would estimate, up to its own bias).
    k2 = kl_estimate(logprobs, ref, torch.ones(1, n), "k2")
    assert abs(float(k2.mean) - exact) > 40 * float(k2.per_token.std()) / math.sqrt(n)
    reverse = float((reference * (reference.log() - policy.log())).sum())
    assert abs(reverse - exact) > 0.1
