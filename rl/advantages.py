"""Advantage estimators: GAE over response tokens, group-relative advantages, masked whitening.

Shapes: ``B`` sequences, ``T`` response tokens, ``G`` samples per prompt; ``mask`` [B, T] is 1 on
real response tokens (right padding). Groups are contiguous rows: B = prompts x G. Padded
positions may hold any value (NaN and inf included); outputs are exactly 0 there and do not depend
on them. Advantages and returns are targets: they carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rl.masked import lookup, zero_padding

GroupScale = Literal["group", "batch", "none"]


@dataclass(frozen=True)
class GAEOutput:
    """Generalised advantage estimates and the value targets they imply."""

    advantages: Tensor  # [B, T] A_t, 0 at padding
    returns: Tensor  # [B, T] A_t + V(s_t), the critic's regression target, 0 at padding


def token_rewards(scores: Tensor, mask: Tensor, *, kl: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """Token-level rewards for GAE: each sequence's score on its last real token, minus kl_coef * KL.

    The KL-penalised reward R = r - β log(π/π_ref) of Ziegler et al. 2019 ("Fine-Tuning Language
    Models from Human Preferences") spread over tokens: r_t = score * [t = last real token] - kl_coef * KL_t.

    Args:
        scores: [B] one scalar reward per sequence.
        mask: [B, T] 1 on real response tokens (right padding).
        kl: [B, T] per-token KL estimate (e.g. ``kl_estimate(...).per_token``), or None.
        kl_coef: weight of the KL penalty.

    Returns:
        [B, T] rewards, 0 at padding. A row with no real token gets no score.
    """
    real = mask.bool()
    lengths = real.sum(dim=1)
    positions = torch.arange(real.shape[1], device=real.device)
    is_last = real & (positions[None, :] == (lengths - 1)[:, None])
    scores = scores.detach()
    rewards = torch.where(is_last, scores[:, None], torch.zeros((), dtype=scores.dtype, device=scores.device))
    if kl is not None:
        rewards = rewards - kl_coef * zero_padding(kl.detach(), real)
    return zero_padding(rewards, real)


def kl_penalised_scores(scores: Tensor, kl: Tensor, mask: Tensor, *, kl_coef: float) -> Tensor:
    """Sequence rewards with the KL folded in: score - kl_coef * Σ_t KL_t over real tokens.

    The sum of the token rewards ``token_rewards`` gives GAE, so sequence-level advantages (group
    z-score) see the same KL penalty as token-level ones (Ziegler et al. 2019, per sequence).

    Args:
        scores: [B] one scalar reward per sequence.
        kl: [B, T] per-token KL estimate; padding may hold anything.
        mask: [B, T] 1 on real response tokens.
        kl_coef: weight of the penalty (0 returns ``scores``).

    Returns:
        [B] penalised sequence rewards.
    """
    return scores - kl_coef * zero_padding(kl.detach(), mask.bool()).sum(dim=1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> GAEOutput:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 16) over the response tokens.

    δ_t = r_t + γ V(s_{t+1}) - V(s_t),   A_t = Σ_{l>=0} (γλ)^l δ_{t+l}.

    The episode ends at the last real token: V after it is 0 (no bootstrap). λ = 1 gives the
    Monte Carlo return minus V; λ = 0 gives the TD(0) error.

    Args:
        rewards: [B, T] token-level rewards (a sequence score on the last real token, any KL
            shaping already added; see ``token_rewards``).
        values: [B, T] critic values V(s_t). Detached: no gradient flows back into the critic.
        mask: [B, T] 1 on real response tokens, right padding.
        gamma: discount γ. lam: GAE λ.

    Returns:
        GAEOutput(advantages [B, T], returns [B, T] = advantages + values), both 0 at padding.
    """
    real = mask.bool()
    rewards = zero_padding(rewards.detach(), real)
    values = zero_padding(values.detach(), real)
    # Right padding: position t+1 is real iff the episode continues, so V(s_{t+1}) and A_{t+1} are
    # already 0 after the last real token once padding is zeroed.
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = zero_padding(rewards + gamma * next_values - values, real)
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    # A backward loop over T, vectorised over B: O(B T) work, O(B T) memory.
    for t in range(deltas.shape[1] - 1, -1, -1):
        running = deltas[:, t] + gamma * lam * running
        advantages[:, t] = running
    advantages = zero_padding(advantages, real)
    return GAEOutput(advantages=advantages, returns=zero_padding(advantages + values, real))


def _shifted_mean(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    # Centre on the first element before averaging: x - x[0] is exactly 0 for a constant slice, so a
    # group of equal rewards gives exactly 0 (a plain mean of 0.1, 0.1, 0.1 is not exactly 0.1).
    pivot = x.narrow(dim, 0, 1)
    diff = x - pivot
    return diff, diff.mean(dim=dim, keepdim=True)


def _std(x: Tensor, dim: int | None) -> Tensor:
    """Bessel-corrected std; 0 (not NaN) for a single element."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x.std(dim=dim, correction=1, keepdim=dim is not None)


def _scale_group(centred: Tensor, grouped: Tensor, eps: float) -> Tensor:
    # std is shift-invariant; taking it of the centred rewards keeps a constant group exactly 0.
    return centred / (_std(centred, dim=1) + eps)


def _scale_batch(centred: Tensor, grouped: Tensor, eps: float) -> Tensor:
    return centred / (_std(grouped.flatten(), dim=None) + eps)


def _scale_none(centred: Tensor, grouped: Tensor, eps: float) -> Tensor:
    return centred


# The config literal -> normalisation table for group advantages.
GROUP_SCALES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "group": _scale_group,
    "batch": _scale_batch,
    "none": _scale_none,
}


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: GroupScale = "group", eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages for G samples of one prompt (GRPO outcome supervision: Shao et al.
    2024, DeepSeekMath, section 4.1.2; "none" is Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like
    Training").

    - "group": (r - mean_group) / (std_group + eps), std with Bessel's correction (GRPO);
    - "batch": (r - mean_group) / (std over the whole batch of rewards + eps);
    - "none":  r - mean_group (Dr. GRPO: no std division, which biases towards easy/hard prompts).

    A group whose rewards are all equal gives exactly 0; a group of one gives 0, never NaN.

    Args:
        rewards: [B] sequence rewards, B = prompts x G, each group's G rows contiguous.
        group_size: G.
        scale: "group" | "batch" | "none".
        eps: added to the std.

    Returns:
        [B] advantages (no gradient), in the rewards' floating dtype (float32 for integer rewards).
    """
    if group_size < 1 or rewards.ndim != 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"rewards must be [B] with B a multiple of group_size; got shape {tuple(rewards.shape)} "
            f"and group_size {group_size}. Keep each prompt's G samples as contiguous rows."
        )
    scale_fn = lookup(GROUP_SCALES, scale, "advantage scale")
    rewards = rewards.detach()
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    grouped = rewards.reshape(-1, group_size)
    diff, mean_diff = _shifted_mean(grouped, dim=1)
    centred = diff - mean_diff
    return scale_fn(centred, grouped, eps).reshape(-1)


def masked_whiten(x: Tensor, mask: Tensor, *, eps: float = 1e-8) -> Tensor:
    """(x - mean) * rsqrt(var + eps) over the real tokens of the whole batch (advantage whitening,
    as in OpenAI baselines' PPO2 and OpenRLHF).

    The variance is Bessel-corrected. A constant input (or a single real token) gives exactly 0.

    Args:
        x: [B, T] values to whiten. Gradients flow through (the caller decides whether to detach).
        mask: [B, T] 1 on real tokens.
        eps: added to the variance.

    Returns:
        [B, T] whitened values, 0 at padding.
    """
    real = mask.bool()
    clean = zero_padding(x, real)
    count = real.sum()
    # Pivot on the first real element (argmax returns the first maximum) so that a constant input
    # centres to exactly 0; see _shifted_mean.
    pivot = clean.flatten()[real.flatten().to(torch.uint8).argmax()]
    diff = zero_padding(clean - pivot, real)
    centred = zero_padding(diff - diff.sum() / count.clamp(min=1), real)
    var = centred.square().sum() / (count - 1).clamp(min=1)
    return zero_padding(centred * torch.rsqrt(var + eps), real)
