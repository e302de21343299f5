"""Policy and value losses: PPO clipped surrogate, clipped value loss, GRPO loss. All are minimised.

Shapes: ``B`` sequences, ``T`` response tokens; ``mask`` [B, T] is 1 on real response tokens
(right padding). Padded positions may hold any value (NaN and inf included): per-token outputs are
exactly 0 there, and neither losses nor gradients depend on them. Gradients flow only through
``logprobs`` (policy losses) or ``values`` (value loss): old log-probs, reference log-probs,
advantages, old values and returns are detached.

Aggregation (one table, ``AGGREGATIONS``), with ``num_items`` the *global* count of the mode's items
across micro-batches and ranks, so that the micro-batch losses add up exactly to the full-batch loss:

- "token_mean":              Σ real-token losses / (number of real tokens, or num_items = global
                             token count). Token-level loss of DAPO (Yu et al. 2025, section 3.3).
- "seq_mean_token_mean":     mean over each sequence's real tokens, then Σ / (B, or num_items =
                             global sequence count); an all-padding row counts 0. GRPO as in
                             DeepSeekMath (Shao et al. 2024, eq. 3).
- "seq_mean_token_sum_norm": Σ real-token losses / ((B, or num_items = global sequence count) x
                             max_len), max_len defaulting to T. Dr. GRPO (Liu et al. 2025): pass the
                             generation budget as max_len so the normaliser is a constant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rl.kl import kl_estimate
from rl.masked import lookup, masked_mean, zero_padding

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
Count = int | float | Tensor


@dataclass(frozen=True)
class PolicyLossOutput:
    """PPO clipped-surrogate loss and its diagnostics."""

    loss: Tensor  # [] aggregated loss to minimise
    per_token_loss: Tensor  # [B, T] 0 at padding
    clipfrac: Tensor  # [] share of real tokens where the clipped branch is active, detached
    approx_kl: Tensor  # [] k3 estimate of KL(π_old || π) over the real tokens, detached


@dataclass(frozen=True)
class ValueLossOutput:
    """Clipped value loss and its diagnostics."""

    loss: Tensor  # [] aggregated loss to minimise
    per_token_loss: Tensor  # [B, T] 0 at padding
    clipfrac: Tensor  # [] share of real tokens where the clipped branch is strictly larger, detached


@dataclass(frozen=True)
class GRPOLossOutput:
    """GRPO loss = policy_loss + beta * kl, and its parts."""

    loss: Tensor  # [] aggregated loss to minimise
    policy_loss: Tensor  # [] the clipped-surrogate part, aggregated like the loss
    kl: Tensor  # [] the k3 KL(π || π_ref) part, aggregated like the loss (before beta)
    per_token_loss: Tensor  # [B, T] surrogate + beta * k3, 0 at padding
    clipfrac: Tensor  # [] share of real tokens where the clipped branch is active, detached
    approx_kl: Tensor  # [] k3 estimate of KL(π_old || π) over the real tokens, detached


def _token_mean(x: Tensor, real: Tensor, max_len: int | None, num_items: Count | None) -> Tensor:
    denominator = real.sum() if num_items is None else num_items
    return x.sum() / torch.as_tensor(denominator, device=x.device).clamp(min=1)


def _seq_mean_token_mean(x: Tensor, real: Tensor, max_len: int | None, num_items: Count | None) -> Tensor:
    per_sequence = x.sum(dim=1) / real.sum(dim=1).clamp(min=1)
    denominator = real.shape[0] if num_items is None else num_items
    return per_sequence.sum() / torch.as_tensor(denominator, device=x.device).clamp(min=1)


def _seq_mean_token_sum_norm(x: Tensor, real: Tensor, max_len: int | None, num_items: Count | None) -> Tensor:
    sequences = real.shape[0] if num_items is None else num_items
    length = real.shape[1] if max_len is None else max_len
    return x.sum() / torch.as_tensor(sequences * length, device=x.device).clamp(min=1)


# The config literal -> aggregation table. Each takes (per-token loss [B, T] with 0 at padding,
# real [B, T] bool, max_len, num_items) and returns a scalar.
AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None, Count | None], Tensor]] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    aggregation: Aggregation = "token_mean",
    *,
    max_len: int | None = None,
    num_items: Count | None = None,
) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar by one of ``AGGREGATIONS`` (see the module doc).

    Padded positions of ``per_token`` are ignored, whatever they hold.
    """
    reduce = lookup(AGGREGATIONS, aggregation, "aggregation")
    real = mask.bool()
    return reduce(zero_padding(per_token, real), real, max_len, num_items)


@dataclass(frozen=True)
class _Surrogate:
    per_token: Tensor  # [B, T] clipped surrogate loss, 0 at padding
    clipped: Tensor  # [B, T] bool, the clipped branch strictly smaller (as an objective)
    approx_kl: Tensor  # []


def _clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    real: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    is_weights: Tensor | None = None,
) -> _Surrogate:
    if advantages.ndim == 1:
        advantages = advantages[:, None].expand_as(real)
    advantages = zero_padding(advantages.detach(), real)
    log_ratio = zero_padding(logprobs, real) - zero_padding(old_logprobs.detach(), real)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        # Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
        # Learning", section "Dual-clip PPO"): for A < 0
        # the objective is bounded below by dual_clip * A, i.e. the loss above by -dual_clip * A.
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -dual_clip * advantages), per_token)
    if is_weights is not None:  # decoupled PPO: the clipped term, weighted by π_old / μ (rl/offpolicy.py)
        per_token = per_token * zero_padding(is_weights.detach(), real)
    with torch.no_grad():
        # k3 of KL(π_old || π) with samples from π_old: r = π / π_old, k3 = (r - 1) - log r.
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, real)
    return _Surrogate(
        per_token=zero_padding(per_token, real), clipped=(clipped > unclipped) & real, approx_kl=approx_kl
    )


def _check_clips(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0; got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020 use 3.0) or None; got {dual_clip}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "token_mean",
    max_len: int | None = None,
    num_items: Count | None = None,
    dual_clip: float | None = None,
    is_weights: Tensor | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate, to minimise (Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", eq. 7), with the asymmetric "clip-higher" range of DAPO (Yu et al. 2025, section 3.1) and
    optional dual clip (Ye et al. 2020).

    per token: -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A),  r = exp(logprobs - old_logprobs).

    Args:
        logprobs: [B, T] log π(a_t|s_t) under the current policy. The only input gradients reach.
        old_logprobs: [B, T] log π_old(a_t|s_t) under the behaviour policy (detached).
        advantages: [B] (broadcast over tokens) or [B, T] (detached).
        mask: [B, T] 1 on real response tokens.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        aggregation, max_len, num_items: see the module doc.
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c A; None disables it.
        is_weights: [B, T] per-token importance weights (detached) multiplying each token's clipped
            term, for samples drawn by another policy than π_old (``rl.offpolicy``); None: all 1.

    Returns:
        PolicyLossOutput(loss [], per_token_loss [B, T], clipfrac [], approx_kl []). clipfrac is the
        share of real tokens where clip(r) A < r A strictly; clipfrac and approx_kl are means over the
        real tokens of this call.
    """
    _check_clips(clip_low, clip_high, dual_clip)
    real = mask.bool()
    surrogate = _clipped_surrogate(logprobs, old_logprobs, advantages, real, clip_low, clip_high, dual_clip,
                                   is_weights)
    return PolicyLossOutput(
        loss=aggregate(surrogate.per_token, real, aggregation, max_len=max_len, num_items=num_items),
        per_token_loss=surrogate.per_token,
        clipfrac=masked_mean(surrogate.clipped.to(logprobs.dtype), real),
        approx_kl=surrogate.approx_kl,
    )


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = 0.2,
    aggregation: Aggregation = "token_mean",
    max_len: int | None = None,
    num_items: Count | None = None,
) -> ValueLossOutput:
    """Value loss of PPO (Schulman et al. 2017, L^VF in eq. 9), clipped as in OpenAI baselines' PPO2:

    per token: 0.5 * max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2); clip=None: 0.5 (V - R)^2.

    Args:
        values: [B, T] V(s_t) under the current critic. The only input gradients reach.
        old_values: [B, T] V_old(s_t) at rollout time (detached).
        returns: [B, T] regression targets, e.g. ``gae(...).returns`` (detached).
        mask: [B, T] 1 on real response tokens.
        clip: clipping radius around old_values, or None for the plain squared error.
        aggregation, max_len, num_items: see the module doc.

    Returns:
        ValueLossOutput(loss [], per_token_loss [B, T], clipfrac [] = share of real tokens where the
        clipped error is strictly larger, detached).
    """
    real = mask.bool()
    values = zero_padding(values, real)
    returns = zero_padding(returns.detach(), real)
    unclipped = 0.5 * (values - returns).square()
    if clip is None:
        per_token, clipped_active = unclipped, torch.zeros_like(real)
    else:
        old_values = zero_padding(old_values.detach(), real)
        clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
        clipped = 0.5 * (clipped_values - returns).square()
        per_token, clipped_active = torch.maximum(unclipped, clipped), clipped > unclipped
    per_token = zero_padding(per_token, real)
    return ValueLossOutput(
        loss=aggregate(per_token, real, aggregation, max_len=max_len, num_items=num_items),
        per_token_loss=per_token,
        clipfrac=masked_mean((clipped_active & real).to(values.dtype), real).detach(),
    )


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.04,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "seq_mean_token_mean",
    max_len: int | None = None,
    num_items: Count | None = None,
    is_weights: Tensor | None = None,
) -> GRPOLossOutput:
    """GRPO loss, to minimise (Shao et al. 2024, DeepSeekMath, eq. 3 with the k3 KL of eq. 4):

    per token: -min(r A, clip(r) A) + beta * (π_ref/π - log(π_ref/π) - 1).

    Args:
        logprobs: [B, T] log π(a_t|s_t), current policy. The only input gradients reach.
        old_logprobs: [B, T] log π_old(a_t|s_t), behaviour policy (detached).
        ref_logprobs: [B, T] log π_ref(a_t|s_t), reference policy (detached).
        advantages: [B] group advantages (see ``group_advantages``) or [B, T] (detached).
        mask: [B, T] 1 on real response tokens.
        beta: KL coefficient; 0 drops the KL term (as DAPO and Dr. GRPO do).
        clip_low, clip_high, aggregation, max_len, num_items, is_weights: as in ``policy_loss`` (the
            weights scale the surrogate only: the KL term is a penalty on the current policy, not an
            estimate of the sampled return).

    Returns:
        GRPOLossOutput with loss = policy_loss + beta * kl, each part aggregated the same way.
    """
    _check_clips(clip_low, clip_high, None)
    real = mask.bool()
    surrogate = _clipped_surrogate(logprobs, old_logprobs, advantages, real, clip_low, clip_high, None, is_weights)
    kl = kl_estimate(logprobs, ref_logprobs, real, "k3").per_token
    per_token = surrogate.per_token + beta * kl

    def reduce(x: Tensor) -> Tensor:
        return aggregate(x, real, aggregation, max_len=max_len, num_items=num_items)

    return GRPOLossOutput(
        loss=reduce(per_token),
        policy_loss=reduce(surrogate.per_token),
        kl=reduce(kl),
        per_token_loss=per_token,
        clipfrac=masked_mean(surrogate.clipped.to(logprobs.dtype), real),
        approx_kl=surrogate.approx_kl,
    )


def trpo_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    aggregation: Aggregation = "token_mean",
    max_len: int | None = None,
    num_items: Count | None = None,
    is_weights: Tensor | None = None,
) -> Tensor:
    """TRPO's surrogate loss -E[r_t A_t], r_t = π(a_t|s_t) / π_old(a_t|s_t) (Schulman et al. 2015, eq. 14).

    Unclipped: the trust region does the clipping's job. At π = π_old its gradient equals the
    policy gradient.

    Args:
        logprobs: [B, T] log π(a_t|s_t). Gradients flow here.
        old_logprobs: [B, T] log π_old(a_t|s_t), detached by the caller.
        advantages: [B, T] advantage per token.
        mask: [B, T] 1 on real response tokens.
        aggregation, max_len, num_items: as in ``aggregate``.
        is_weights: [B, T] per-token importance weights π_old / μ (detached) for samples drawn by another
            policy μ; None: all 1.

    Returns:
        [] the aggregated loss to minimise.
    """
    real = mask.bool()
    ratio = torch.exp(zero_padding(logprobs, real) - zero_padding(old_logprobs, real))
    per_token = zero_padding(-advantages * ratio, real)
    if is_weights is not None:
        per_token = per_token * zero_padding(is_weights.detach(), real)
    return aggregate(per_token, mask, aggregation, max_len=max_len, num_items=num_items)
