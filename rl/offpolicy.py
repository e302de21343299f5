"""Correction for samples drawn by other weights than the ones the update starts from.

With pipelined rollouts the generator samples step k+1 while the trainer updates on step k, so the
samples of a step come from the behaviour policy μ = π_{θ_{k-1}} (the weights one version back) while
the update's ratio is taken against the proximal policy π_prox = π_{θ_k} (the weights before this
update; its log-probs are the "old" log-probs of the loss). This is decoupled PPO (Hilton et al. 2022,
"Batch size-invariance for policy optimization", section 3; AReaL, Fu et al. 2025, eq. 5): the clipped
surrogate in π / π_prox keeps the trust region around the current weights, and each token's loss is
weighted by π_prox / μ to correct for the sampling distribution. The weight is truncated at `cap`
(truncated importance sampling, Ionides 2008; as applied to sampler/trainer mismatch by Yao et al.
2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training") so that one token the
behaviour policy found unlikely cannot dominate the batch.

Shapes: ``B`` sequences, ``T`` response tokens; ``mask`` [B, T] is 1 on real response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rl.masked import masked_mean, zero_padding


@dataclass(frozen=True)
class ISWeights:
    """Truncated importance weights and their diagnostics."""

    weights: Tensor  # [B, T] min(π_prox / μ, cap) on real tokens, 0 at padding, detached
    mean: Tensor  # [] mean weight over real tokens (after truncation)
    truncated_fraction: Tensor  # [] share of real tokens whose weight was cut to `cap`


def truncated_is_weights(proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *,
                         cap: float) -> ISWeights:
    """Per-token importance weights w_t = min(π_prox(a_t|s_t) / μ(a_t|s_t), cap).

    Args:
        proximal_logprobs: [B, T] log π_prox of the sampled tokens (the update's old log-probs).
        behaviour_logprobs: [B, T] log μ of the sampled tokens, as the generator reported them.
        mask: [B, T] 1 on real response tokens; padded positions may hold anything (NaN included).
        cap: the truncation level, > 0 (1 turns the correction into down-weighting only).

    Returns:
        ISWeights: weights [B, T] (detached: they scale the loss, no gradient flows through them),
        their mean and the share of real tokens cut to `cap`, both over real tokens.
    """
    if not cap > 0:
        raise ValueError(f"the truncation cap must be > 0, got {cap}")
    real = mask.bool()
    log_ratio = zero_padding(proximal_logprobs.detach(), real) - zero_padding(behaviour_logprobs.detach(), real)
    ratio = torch.exp(log_ratio)
    weights = zero_padding(torch.clamp(ratio, max=cap), real)
    truncated = (ratio > cap) & real
    return ISWeights(weights=weights, mean=masked_mean(weights, real),
                     truncated_fraction=masked_mean(truncated.to(weights.dtype), real))
