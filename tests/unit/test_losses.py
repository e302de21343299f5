"""PPO / GRPO / value losses: hand values, clipping, aggregation, micro-batch splits, gradients."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from rl.losses import aggregate, grpo_loss, policy_loss, value_loss

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: {"rtol": 1e-6, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}
AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
NAN, INF = float("nan"), float("inf")


def _mask(lengths: list[int], t: int) -> Tensor:
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_on_policy_ratio_one_gives_minus_mean_advantage(aggregation: str, dtype: torch.dtype) -> None:
    lengths, advantages = [3, 1, 2, 0], [1.0, -2.0, 0.5, 3.0]
    mask = _mask(lengths, 3)
    logprobs = (torch.randn(4, 3, dtype=dtype) - 2.0).requires_grad_()
    out = policy_loss(
        logprobs,
        logprobs.detach().clone(),
        torch.tensor(advantages, dtype=dtype),
        mask,
        aggregation=aggregation,
    )
    # Per-token loss is -A; the weight of one real token of row b in the aggregate:
    weight = {
        "token_mean": [1 / 6] * 4,  # 6 real tokens
        "seq_mean_token_mean": [1 / (4 * n) if n else 0.0 for n in lengths],  # the empty row counts 0
        "seq_mean_token_sum_norm": [1 / (4 * 3)] * 4,  # B x max_len
    }[aggregation]
    expected = -sum(a * n * w for a, n, w in zip(advantages, lengths, weight, strict=True))
    # token_mean: -(1*3 - 2*1 + 0.5*2) / 6; seq_mean_token_mean: -(1 - 2 + 0.5 + 0) / 4; sum_norm: -2 / 12
    assert expected == pytest.approx(
        {"token_mean": -2 / 6, "seq_mean_token_mean": 0.5 / 4, "seq_mean_token_sum_norm": -2 / 12}[
            aggregation
        ]
    )
    torch.testing.assert_close(out.loss, torch.tensor(expected, dtype=dtype), **TOL[dtype])
    out.loss.backward()
    # d/dlogp of -A * exp(logp - old) at ratio 1 is -A, times the token's weight; 0 at padding.
    grad = torch.tensor(
        [
            [-a * w if j < n else 0.0 for j in range(3)]
            for a, n, w in zip(advantages, lengths, weight, strict=True)
        ],
        dtype=dtype,
    )
    torch.testing.assert_close(logprobs.grad, grad, **TOL[dtype])
    assert out.clipfrac.item() == 0.0
    assert out.approx_kl.item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_clipping_and_clipfrac_on_a_constructed_case(dtype: torch.dtype) -> None:
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1, 7.0]
    advantages = torch.tensor([[2.0, 2.0, -1.0, -1.0, 3.0, NAN]], dtype=dtype)
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, INF]], dtype=dtype)
    logprobs = (old.detach() + torch.tensor([ratios], dtype=dtype).log()).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    out = policy_loss(logprobs, old, advantages, mask)
    per_token = [
        -min(1.5 * 2, 1.2 * 2),  # r above 1 + ε with A > 0: clipped branch (2.4 < 3)
        -min(0.5 * 2, 0.8 * 2),  # r below 1 - ε with A > 0: unclipped (1.0 < 1.6)
        -min(0.5 * -1, 0.8 * -1),  # r below 1 - ε with A < 0: clipped (-0.8 < -0.5)
        -min(1.5 * -1, 1.2 * -1),  # r above 1 + ε with A < 0: unclipped (-1.5 < -1.2)
        -min(1.1 * 3, 1.1 * 3),  # inside the range: both equal, not counted as clipped
        0.0,  # padding
    ]
    torch.testing.assert_close(out.per_token_loss, torch.tensor([per_token], dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(out.loss, torch.tensor(sum(per_token) / 5, dtype=dtype), **TOL[dtype])
    assert out.clipfrac.item() == pytest.approx(2 / 5, rel=1e-7)
    k3 = [(r - 1) - math.log(r) for r in ratios[:5]]  # KL(π_old || π) with r = π / π_old
    torch.testing.assert_close(out.approx_kl, torch.tensor(sum(k3) / 5, dtype=dtype), **TOL[dtype])
    assert not out.clipfrac.requires_grad and not out.approx_kl.requires_grad
    out.loss.backward()
    grad = logprobs.grad[0]
    assert grad[0].item() == 0.0 and grad[2].item() == 0.0 and grad[5].item() == 0.0  # clipped, padding
    assert bool((grad[[1, 3, 4]] != 0).all())


def test_clip_higher_is_asymmetric() -> None:
    logprobs = torch.tensor([[math.log(1.25), math.log(0.75)]], dtype=torch.float64)
    zeros, adv, mask = (
        torch.zeros(1, 2, dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64),
        torch.ones(1, 2),
    )
    symmetric = policy_loss(logprobs, zeros, adv, mask, aggregation="seq_mean_token_sum_norm")
    higher = policy_loss(
        logprobs, zeros, adv, mask, clip_low=0.2, clip_high=0.28, aggregation="seq_mean_token_sum_norm"
    )
    torch.testing.assert_close(symmetric.per_token_loss, torch.tensor([[-1.2, -0.75]], dtype=torch.float64))
    torch.testing.assert_close(higher.per_token_loss, torch.tensor([[-1.25, -0.75]], dtype=torch.float64))
    assert symmetric.clipfrac.item() == 0.5 and higher.clipfrac.item() == 0.0


def test_dual_clip_bounds_negative_advantage_losses() -> None:
    ratios = torch.tensor([[5.0, 5.0, 2.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 1.0, -1.0]], dtype=torch.float64)
    zeros, mask = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3)
    plain = policy_loss(ratios.log(), zeros, adv, mask)
    dual = policy_loss(ratios.log(), zeros, adv, mask, dual_clip=3.0)
    torch.testing.assert_close(plain.per_token_loss, torch.tensor([[5.0, -1.2, 2.0]], dtype=torch.float64))
    # -max(min(rA, clip(r)A), 3A) for A < 0: min(5, 3) = 3; A > 0 and small losses unchanged
    torch.testing.assert_close(dual.per_token_loss, torch.tensor([[3.0, -1.2, 2.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(ratios.log(), zeros, adv, mask, dual_clip=1.0)


def test_sequence_advantages_broadcast_like_token_advantages() -> None:
    gen = torch.Generator().manual_seed(0)
    logprobs, old = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    adv, mask = torch.randn(3, generator=gen), _mask([4, 2, 1], 4)
    for aggregation in AGGREGATIONS:
        a = policy_loss(logprobs, old, adv, mask, aggregation=aggregation)
        b = policy_loss(logprobs, old, adv[:, None].expand(3, 4).clone(), mask, aggregation=aggregation)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.per_token_loss, b.per_token_loss)


def _random_batch(dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 0, 1, 4, 2]
    mask = _mask(lengths, 5)
    junk = torch.where(mask, 0.0, NAN)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    logprobs = rand(6, 5) * 0.3 - 1.0
    return {
        "logprobs": (logprobs + junk).to(dtype),
        "old_logprobs": (logprobs + 0.3 * rand(6, 5) + junk).to(dtype),
        "ref_logprobs": (logprobs + 0.3 * rand(6, 5) - junk).to(dtype),
        "advantages": rand(6).to(dtype),
        "values": (rand(6, 5) + junk).to(dtype),
        "old_values": (rand(6, 5) * 0.1 + junk).to(dtype),
        "returns": (rand(6, 5) - junk).to(dtype),
        "mask": mask,
    }


def _policy(b: dict[str, Tensor], **kw) -> Tensor:
    return policy_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"], dual_clip=3.0, **kw).loss


def _grpo(b: dict[str, Tensor], **kw) -> Tensor:
    return grpo_loss(
        b["logprobs"], b["old_logprobs"], b["ref_logprobs"], b["advantages"], b["mask"], beta=0.1, **kw
    ).loss


def _value(b: dict[str, Tensor], **kw) -> Tensor:
    return value_loss(b["values"], b["old_values"], b["returns"], b["mask"], clip=0.2, **kw).loss


LOSSES: dict[str, tuple[Callable[..., Tensor], str]] = {
    "policy": (_policy, "logprobs"),
    "grpo": (_grpo, "logprobs"),
    "value": (_value, "values"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_micro_batches_add_up_to_the_full_batch(loss_name: str, aggregation: str, dtype: torch.dtype) -> None:
    fn, trained = LOSSES[loss_name]
    full = _random_batch(dtype)
    full[trained].requires_grad_()
    mask = full["mask"]
    # num_items is the global count of the mode's items: real tokens for token_mean, else sequences.
    num_items = int(mask.sum()) if aggregation == "token_mean" else mask.shape[0]
    loss_full = fn(full, aggregation=aggregation)
    (grad_full,) = torch.autograd.grad(loss_full, full[trained])
    torch.testing.assert_close(
        fn(full, aggregation=aggregation, num_items=num_items, max_len=5), loss_full, **TOL[dtype]
    )

    leaf = full[trained].detach().requires_grad_()
    total = torch.zeros((), dtype=dtype)
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        # Each micro-batch trimmed to its own longest row, as a packer would: max_len keeps the
        # Dr. GRPO normaliser global.
        width = max(1, int(mask[rows].sum(dim=1).max()))
        micro = {k: v[rows] if v.ndim == 1 else v[rows, :width] for k, v in full.items()}
        micro[trained] = leaf[rows, :width]
        loss = fn(micro, aggregation=aggregation, num_items=num_items, max_len=5)
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, loss_full.detach(), **TOL[dtype])
    torch.testing.assert_close(leaf.grad, grad_full, **TOL[dtype])


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_padding_junk_changes_nothing(loss_name: str) -> None:
    fn, trained = LOSSES[loss_name]
    junky = _random_batch(torch.float64)
    real = junky["mask"]
    clean = {
        k: torch.where(real, v, 0.0) if v.ndim == 2 and v.is_floating_point() else v for k, v in junky.items()
    }
    assert not bool(torch.isfinite(junky[trained]).all())
    for batch in (junky, clean):
        batch[trained].requires_grad_()
    for aggregation in AGGREGATIONS:
        a, b = fn(junky, aggregation=aggregation), fn(clean, aggregation=aggregation)
        assert torch.isfinite(a) and torch.equal(a, b)
        (ga,) = torch.autograd.grad(a, junky[trained])
        (gb,) = torch.autograd.grad(b, clean[trained])
        assert torch.equal(ga, gb)
        assert bool((ga[~real] == 0).all())


def test_gradients_flow_only_through_logprobs_and_values() -> None:
    b = _random_batch(torch.float64)
    for key in ("logprobs", "old_logprobs", "ref_logprobs", "advantages", "values", "old_values", "returns"):
        b[key].requires_grad_()
    out = grpo_loss(b["logprobs"], b["old_logprobs"], b["ref_logprobs"], b["advantages"], b["mask"])
    ppo = policy_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"])
    vf = value_loss(b["values"], b["old_values"], b["returns"], b["mask"])
    (out.loss + ppo.loss + vf.loss).backward()
    for key in ("old_logprobs", "ref_logprobs", "advantages", "old_values", "returns"):
        assert b[key].grad is None, key
    assert b["logprobs"].grad is not None and b["values"].grad is not None
    assert (
        not ppo.clipfrac.requires_grad and not ppo.approx_kl.requires_grad and not vf.clipfrac.requires_grad
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_loss_hand_values(dtype: torch.dtype) -> None:
    values = torch.tensor([[1.5, 1.1, 0.5, 1.5, NAN]], dtype=dtype, requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, INF]], dtype=dtype)
    returns = torch.tensor([[2.0, 2.0, 0.0, 1.0, NAN]], dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    clipped = value_loss(values, old, returns, mask, clip=0.2)
    per_token = [
        0.5 * max((1.5 - 2.0) ** 2, (1.2 - 2.0) ** 2),  # clipped to old + 0.2 = 1.2: larger, active
        0.5 * max((1.1 - 2.0) ** 2, (1.1 - 2.0) ** 2),  # within the radius: equal, not active
        0.5 * max((0.5 - 0.0) ** 2, (0.8 - 0.0) ** 2),  # clipped to old - 0.2 = 0.8: larger, active
        0.5 * max((1.5 - 1.0) ** 2, (1.2 - 1.0) ** 2),  # clipped but smaller: unclipped wins
        0.0,
    ]
    torch.testing.assert_close(clipped.per_token_loss, torch.tensor([per_token], dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(clipped.loss, torch.tensor(sum(per_token) / 4, dtype=dtype), **TOL[dtype])
    assert clipped.clipfrac.item() == 0.5
    clipped.loss.backward()
    # Where the clipped branch is active the clamp is saturated: no gradient.
    torch.testing.assert_close(
        values.grad,
        torch.tensor([[0.0, (1.1 - 2.0) / 4, 0.0, (1.5 - 1.0) / 4, 0.0]], dtype=dtype),
        **TOL[dtype],
    )
    plain = value_loss(values, old, returns, mask, clip=None)
    unclipped = [
        0.5 * (1.5 - 2.0) ** 2,
        0.5 * (1.1 - 2.0) ** 2,
        0.5 * (0.5 - 0.0) ** 2,
        0.5 * (1.5 - 1.0) ** 2,
        0.0,
    ]
    torch.testing.assert_close(plain.per_token_loss, torch.tensor([unclipped], dtype=dtype), **TOL[dtype])
    assert plain.clipfrac.item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_grpo_loss_is_surrogate_plus_beta_k3(aggregation: str, dtype: torch.dtype) -> None:
    # Ratio 1 (old = current); π_ref = π / 2 on every token, so k3 = 1/2 - log(1/2) - 1 = log 2 - 1/2.
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, NAN, NAN]], dtype=dtype)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([2.0, -1.0], dtype=dtype)
    out = grpo_loss(
        logprobs, logprobs, logprobs + math.log(0.5), adv, mask, beta=0.04, aggregation=aggregation
    )
    k3 = math.log(2.0) - 0.5
    expected = torch.tensor([[-2.0 + 0.04 * k3] * 3, [1.0 + 0.04 * k3, 0.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(out.per_token_loss, expected, **TOL[dtype])
    torch.testing.assert_close(out.loss, out.policy_loss + 0.04 * out.kl, **TOL[dtype])
    torch.testing.assert_close(
        out.kl, aggregate(torch.full((2, 3), k3, dtype=dtype), mask, aggregation), **TOL[dtype]
    )
    torch.testing.assert_close(
        out.policy_loss,
        policy_loss(logprobs, logprobs, adv, mask, aggregation=aggregation).loss,
        **TOL[dtype],
    )
    no_kl = grpo_loss(
        logprobs, logprobs, logprobs + math.log(0.5), adv, mask, beta=0.0, aggregation=aggregation
    )
    torch.testing.assert_close(no_kl.loss, out.policy_loss, **TOL[dtype])


def test_unknown_aggregation_names_the_choices() -> None:
    with pytest.raises(ValueError, match="'token_mean', 'seq_mean_token_mean', 'seq_mean_token_sum_norm'"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), aggregation="sum")  # type: ignore[arg-type]


def test_trpo_surrogate_hand_worked():
    from rl.losses import trpo_surrogate

    # Row 0: ratios e^0.1 and e^-0.2 with advantages 1 and -2; row 1: one real token, ratio 1, A = 3.
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, float("nan")]])
    old = torch.tensor([[-1.1, -1.8], [-0.5, 7.0]])
    adv = torch.tensor([[1.0, -2.0], [3.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    expected = -(math.exp(0.1) * 1.0 + math.exp(-0.2) * -2.0 + 1.0 * 3.0) / 3
    out = trpo_surrogate(logprobs, old, adv, mask)
    assert out.item() == pytest.approx(expected, abs=1e-6)
    # At π = π_old the gradient is the policy gradient -A / N on real tokens, exactly 0 on padding.
    lp = old.clone().requires_grad_(True)
    trpo_surrogate(lp, old, adv, mask).backward()
    assert torch.allclose(lp.grad, torch.tensor([[-1 / 3, 2 / 3], [-1.0, 0.0]]), atol=1e-7)
