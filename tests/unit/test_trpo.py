"""TRPO: Fisher-vector products against explicit Hessians, CG against a dense solve, the line search."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from rl.trpo import (
    conjugate_gradient,
    fisher_vector_product,
    make_fisher_vector_product,
    mean_categorical_kl,
    trpo_step,
)

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: {"rtol": 1e-6, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}
B, T, D, V = 3, 4, 3, 5
LENGTHS = [4, 2, 1]


def _policy(dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Features x [B, T, D] with large finite junk at padding, W [D, V], mask [B, T]."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    x = torch.where(mask[..., None], x, 50.0)
    w = torch.randn(D, V, generator=gen, dtype=torch.float64) * 0.5
    return x.to(dtype), w.to(dtype).requires_grad_(), mask


def _exact_mean_kl(x_real: Tensor, w_old: Tensor, w_new: Tensor) -> Tensor:
    """KL(π_old || π_new) averaged over the real tokens [N, D], written out independently."""
    p_old = torch.softmax(x_real @ w_old, dim=-1)
    return (
        (p_old * (torch.log_softmax(x_real @ w_old, -1) - torch.log_softmax(x_real @ w_new, -1)))
        .sum(-1)
        .mean()
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("old_is_current", [True, False])
def test_fvp_equals_explicit_hessian_of_mean_kl(dtype: torch.dtype, old_is_current: bool) -> None:
    x, w, mask = _policy(dtype)
    w_old = (
        w.detach()
        if old_is_current
        else w.detach() + 0.3 * torch.randn(D, V, dtype=dtype, generator=torch.Generator().manual_seed(5))
    )
    x_real = x[mask]  # only the real tokens: padding must not contribute
    hessian = torch.autograd.functional.hessian(lambda m: _exact_mean_kl(x_real, w_old, m), w.detach())
    hessian = hessian.reshape(D * V, D * V)
    v = torch.randn(D * V, dtype=dtype, generator=torch.Generator().manual_seed(7))
    old = None if old_is_current else torch.log_softmax(x @ w_old, dim=-1)
    product = fisher_vector_product(lambda: x @ w, old, mask, [w], v, damping=0.1)
    torch.testing.assert_close(product, hessian @ v + 0.1 * v, **TOL[dtype])
    assert w.grad is None  # no .grad side effects on the parameters


def test_fvp_over_several_parameters_in_flat_order() -> None:
    x, w, mask = _policy(torch.float64)
    bias = torch.zeros(V, dtype=torch.float64, requires_grad=True)
    unused = torch.ones(2, dtype=torch.float64, requires_grad=True)
    old = torch.log_softmax(x @ w.detach() + 0.2, dim=-1)
    x_real, old_real = x[mask], old[mask]

    def kl(flat: Tensor) -> Tensor:
        logits = x_real @ flat[: D * V].reshape(D, V) + flat[D * V : D * V + V]
        return (old_real.exp() * (old_real - torch.log_softmax(logits, -1))).sum(-1).mean()

    flat = torch.cat([w.detach().reshape(-1), bias.detach(), unused.detach()])
    hessian = torch.autograd.functional.hessian(kl, flat)
    v = torch.randn(flat.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fvp = make_fisher_vector_product(
        lambda: mean_categorical_kl(x @ w + bias, old, mask), [w, bias, unused], damping=0.0
    )
    torch.testing.assert_close(fvp(v), hessian @ v, **TOL[torch.float64])
    assert torch.equal(fvp(v)[-2:], torch.zeros(2, dtype=torch.float64))  # a parameter the KL ignores


def test_fvp_through_sdpa_attention_needs_no_caller_setup() -> None:
    """CPU sdpa picks a flash kernel without double backward; the FVP switches to math."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, generator=gen)
    proj = torch.randn(8, 8, generator=gen, requires_grad=True)
    head = torch.randn(8, V, generator=gen, requires_grad=True)

    def logits() -> Tensor:
        q = (x @ proj).view(2, 4, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(2, 4, 8) @ head

    v = torch.randn(8 * 8 + 8 * V, generator=gen)
    product = fisher_vector_product(logits, None, torch.ones(2, 4), [proj, head], v, damping=0.1)
    assert product.shape == v.shape and bool(torch.isfinite(product).all())
    assert float(v @ product) > 0.0  # F + damping I is positive definite


def test_cg_equals_dense_solve() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=gen, dtype=torch.float64)
    out = conjugate_gradient(lambda v: a @ v, b, iters=8, residual_tol=0.0)
    torch.testing.assert_close(out.x, torch.linalg.solve(a, b), rtol=1e-10, atol=1e-10)
    assert out.iterations <= 8 and out.residual < 1e-18


@pytest.mark.parametrize("dtype", DTYPES)
def test_cg_on_fisher_vector_products_equals_dense_solve(dtype: torch.dtype) -> None:
    x, w, mask = _policy(dtype)
    x_real = x[mask]
    fisher = torch.autograd.functional.hessian(lambda m: _exact_mean_kl(x_real, w.detach(), m), w.detach())
    damped = fisher.reshape(D * V, D * V) + 0.1 * torch.eye(D * V, dtype=dtype)
    b = torch.randn(D * V, dtype=dtype, generator=torch.Generator().manual_seed(1))
    fvp = make_fisher_vector_product(
        lambda: mean_categorical_kl(x @ w, torch.log_softmax(x @ w, -1).detach(), mask), [w], damping=0.1
    )
    out = conjugate_gradient(fvp, b, iters=D * V, residual_tol=0.0)  # iters = number of parameters
    expected = torch.linalg.solve(damped, b)
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]  # CG's error grows with κ(F + 0.1 I) ≈ 20
    torch.testing.assert_close(out.x, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_cg_stops_at_the_residual_tolerance() -> None:
    out = conjugate_gradient(lambda v: 2.0 * v, torch.zeros(3), iters=10)
    assert out.iterations == 0 and torch.equal(out.x, torch.zeros(3))
    out = conjugate_gradient(lambda v: 2.0 * v, torch.ones(3), iters=10)  # A = 2I: exact in one step
    assert out.iterations == 1 and torch.equal(out.x, torch.full((3,), 0.5))


# A 2-parameter problem worked by hand: loss gᵀθ, KL = ½ θᵀAθ (+ terms with zero Hessian at 0).
# s = -A⁻¹g = (-1/2, 2), sᵀAs = 2/4 + 4 = 9/2, β = sqrt(2 δ / (9/2)) = 1/15 for δ = 0.01,
# full step d = s/15 = (-1/30, 2/15), |d|² = 17/900, gᵀd = -1/30 - 4/15 = -3/10.
G = torch.tensor([1.0, -2.0], dtype=torch.float64)
A = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
MAX_KL = 0.01
FULL_STEP = torch.tensor([-1 / 30, 2 / 15], dtype=torch.float64)
D2 = 17 / 900


def test_line_search_backtracks_when_kl_exceeds_its_quadratic_model() -> None:
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    c = 0.5 * MAX_KL / D2**2  # quartic term: KL(f d) = f² δ + f⁴ δ/2
    result = trpo_step(
        [theta],
        lambda: G @ theta,
        lambda: 0.5 * theta @ A @ theta + c * (theta @ theta) ** 2,
        max_kl=MAX_KL,
        damping=0.0,
    )
    assert result.step_size == pytest.approx(1 / 15, rel=1e-12)
    assert result.expected_improvement == pytest.approx(3 / 10, rel=1e-12)
    assert result.loss_before == 0.0
    assert result.accepted_index == 1
    # trial 0: δ + δ/2 > δ, rejected; trial 1 (f = 0.8): 0.64 δ + 0.4096 δ/2 = 0.8448 δ, accepted.
    assert result.trial_kls == pytest.approx([1.5 * MAX_KL, 0.8448 * MAX_KL], rel=1e-10)
    assert result.trial_losses == pytest.approx([-0.3, -0.8 * 0.3], rel=1e-12)
    torch.testing.assert_close(theta.detach(), 0.8 * FULL_STEP, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("failure", ["kl_too_large", "loss_never_improves"])
def test_line_search_rejects_and_restores_parameters(failure: str) -> None:
    theta0 = torch.tensor([0.3, -0.7], dtype=torch.float64)
    theta = theta0.clone().requires_grad_()

    def loss() -> Tensor:
        d = theta - theta0
        # 1000 |d|² has zero gradient at θ0 but outweighs gᵀd on every trial: at f = 0.8⁹ ≈ 0.134,
        # 1000 f² 17/900 ≈ 0.34 > 0.3 f ≈ 0.04.
        return G @ d + (1000.0 * d @ d if failure == "loss_never_improves" else 0.0)

    def kl() -> Tensor:
        d = theta - theta0
        # 1e7 |d|⁴ has zero Hessian at θ0; at f = 0.8⁹ it adds 1e7 f⁴ (17/900)² ≈ 1.2 >> δ.
        return 0.5 * d @ A @ d + (1e7 * (d @ d) ** 2 if failure == "kl_too_large" else 0.0)

    result = trpo_step([theta], loss, kl, max_kl=MAX_KL, damping=0.0, max_backtracks=10)
    assert result.accepted_index is None and not result.accepted
    assert len(result.trial_kls) == len(result.trial_losses) == 10
    if failure == "kl_too_large":
        assert min(result.trial_kls) > MAX_KL and max(result.trial_losses) < 0.0
    else:
        assert min(result.trial_losses) > 0.0 and max(result.trial_kls) <= MAX_KL
    assert torch.equal(theta.detach(), theta0)  # restored bit for bit


def test_zero_gradient_tries_nothing() -> None:
    theta = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    result = trpo_step([theta], lambda: 0.0 * theta.sum() + 1.5, lambda: 0.5 * theta @ theta)
    assert result.accepted_index is None and result.trial_kls == [] and result.step_size == 0.0
    assert result.loss_before == 1.5 and result.cg_iterations == 0
    assert torch.equal(theta.detach(), torch.tensor([0.3, -0.7], dtype=torch.float64))


def _surrogate_and_kl(x: Tensor, w: Tensor, mask: Tensor, actions: Tensor, advantages: Tensor):
    """loss_fn and kl_fn of one TRPO step of the linear-softmax policy, π_old = the current policy."""
    old = torch.log_softmax(x @ w.detach(), dim=-1)
    old_taken = old.gather(-1, actions[..., None])[..., 0]

    def loss() -> Tensor:
        taken = torch.log_softmax(x @ w, -1).gather(-1, actions[..., None])[..., 0]
        return -(torch.where(mask, torch.exp(taken - old_taken), 0.0) * advantages).sum() / mask.sum()

    return loss, lambda: mean_categorical_kl(x @ w, old, mask)


@pytest.mark.parametrize("max_kl", [0.01, 0.3])
def test_trpo_never_exceeds_max_kl_on_an_accepted_step(max_kl: float) -> None:
    accepted = backtracked = 0
    for seed in range(5):
        x, w, mask = _policy(torch.float64, seed)
        gen = torch.Generator().manual_seed(100 + seed)
        actions = torch.randint(0, V, (B, T), generator=gen)
        advantages = torch.randn(B, T, generator=gen, dtype=torch.float64)
        for _ in range(2):
            w_before = w.detach().clone()
            loss, kl = _surrogate_and_kl(x, w, mask, actions, advantages)
            # Light damping: the full step's true KL is near or above max_kl, so the line search works.
            result = trpo_step([w], loss, kl, max_kl=max_kl, damping=1e-3)
            moved = _exact_mean_kl(x[mask], w_before, w.detach()).item()
            if result.accepted_index is None:
                assert torch.equal(w.detach(), w_before)
                continue
            accepted += 1
            backtracked += result.accepted_index > 0
            assert moved <= max_kl
            assert moved == pytest.approx(result.trial_kls[result.accepted_index], rel=1e-9)
            assert loss().item() < result.loss_before
    assert accepted == 10  # the test is not vacuous
    assert backtracked >= 3  # and several steps needed the line search


def test_trpo_on_a_subset_of_parameters_and_on_lora_adapters_in_float32() -> None:
    torch.manual_seed(0)
    x = torch.randn(B, T, D)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    actions = torch.randint(0, V, (B, T))
    advantages = torch.randn(B, T)
    model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, V))
    lora_a = torch.nn.Parameter(torch.randn(D, 2) * 0.1)
    lora_b = torch.nn.Parameter(torch.zeros(2, 8))  # LoRA starts at zero: B gets the first update

    def logits() -> Tensor:
        hidden = model[0](x) + x @ lora_a @ lora_b
        return model[2](model[1](hidden))

    def step(params, max_kl: float = 0.01):
        with torch.no_grad():  # π_old: the policy before this step
            old = torch.log_softmax(logits(), -1)
        old_taken = old.gather(-1, actions[..., None])[..., 0]

        def loss() -> Tensor:
            taken = torch.log_softmax(logits(), -1).gather(-1, actions[..., None])[..., 0]
            return -(torch.where(mask, torch.exp(taken - old_taken), 0.0) * advantages).sum() / mask.sum()

        def kl() -> Tensor:
            return mean_categorical_kl(logits(), old, mask)

        result = trpo_step(params, loss, kl, max_kl=max_kl)
        assert result.accepted and kl().item() <= max_kl
        return result

    def snapshot() -> list[Tensor]:
        return [p.detach().clone() for p in (model[0].weight, model[2].weight, lora_a, lora_b)]

    model[0].requires_grad_(False)  # "a subset of layers": pass the module, only trainable ones move
    lora_a.requires_grad_(False)
    lora_b.requires_grad_(False)
    start = snapshot()
    step(model)
    after_head = snapshot()
    assert [torch.equal(p, q) for p, q in zip(start, after_head, strict=True)] == [True, False, True, True]

    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    model[2].requires_grad_(False)
    step([lora_a, lora_b])
    after_lora = snapshot()
    assert torch.equal(after_lora[0], after_head[0]) and torch.equal(after_lora[1], after_head[1])
    moved_b = (after_lora[3] - after_head[3]).abs().max().item()
    # LoRA's A has no gradient and no Fisher block while B = 0: it moves by round-off at most.
    assert moved_b > 1e-3 and (after_lora[2] - after_head[2]).abs().max().item() < 1e-4 * moved_b
    assert lora_b.dtype == model[2].weight.dtype == torch.float32


def _sampled_problem(policy_seed: int, sample_seed: int):
    """A float64 policy, random actions and advantages: (x, w, mask, w0 = w's start, loss_fn, kl_fn)."""
    x, w, mask = _policy(torch.float64, policy_seed)
    gen = torch.Generator().manual_seed(sample_seed)
    actions = torch.randint(0, V, (B, T), generator=gen)
    advantages = torch.randn(B, T, generator=gen, dtype=torch.float64)
    loss, kl = _surrogate_and_kl(x, w, mask, actions, advantages)
    return x, w, mask, w.detach().clone(), loss, kl


def test_fisher_on_a_subsample_solves_with_that_subsample_and_checks_the_whole_batch() -> None:
    x, w, mask, w0, loss, kl = _sampled_problem(3, 7)
    old = torch.log_softmax(x @ w0, dim=-1)
    sub = slice(None, None, 2)

    def sub_kl() -> Tensor:
        return mean_categorical_kl(x[sub] @ w, old[sub], mask[sub])

    same = trpo_step([w], loss, kl, max_kl=0.05, fisher_kl_fn=kl)
    moved_same = w.detach().clone()
    with torch.no_grad():
        w.copy_(w0)
    default = trpo_step([w], loss, kl, max_kl=0.05)
    assert torch.equal(w.detach(), moved_same) and same.step_size == default.step_size
    with torch.no_grad():
        w.copy_(w0)
    grad_norm = float(torch.autograd.grad(loss(), [w])[0].norm())
    result = trpo_step([w], loss, kl, max_kl=0.05, fisher_kl_fn=sub_kl)
    # Another Fisher matrix, another natural-gradient step; the same gradient.
    assert result.step_size != default.step_size and result.accepted_index is not None
    assert result.grad_norm == pytest.approx(grad_norm) == pytest.approx(default.grad_norm)
    # The trust region is the whole batch's KL, whatever matrix the direction came from.
    assert _exact_mean_kl(x[mask], w0, w.detach()).item() <= 0.05


def test_all_sum_of_rank_shares_takes_the_one_rank_step() -> None:
    # n ranks holding identical shares: each loss / KL is 1/n of the batch's and all_sum multiplies by
    # n, so the step must be the one-rank step exactly; the damping enters once, not n times.
    _, w, _, w0, loss, kl = _sampled_problem(4, 11)
    one = trpo_step([w], loss, kl, max_kl=0.05, damping=0.1)
    w_one = w.detach().clone()
    with torch.no_grad():
        w.copy_(w0)
    n = 4
    shared = trpo_step([w], lambda: loss() / n, lambda: kl() / n, max_kl=0.05, damping=0.1,
                       all_sum=lambda t: n * t)
    assert one.accepted_index is not None and shared.accepted_index == one.accepted_index
    assert shared.step_size == pytest.approx(one.step_size, rel=1e-12)
    assert shared.trial_kls == pytest.approx(one.trial_kls, rel=1e-12)
    assert shared.loss_before == pytest.approx(one.loss_before, rel=1e-12)
    assert shared.grad_norm == pytest.approx(one.grad_norm, rel=1e-12)
    torch.testing.assert_close(w.detach(), w_one, rtol=1e-12, atol=1e-12)
