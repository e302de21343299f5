"""KL estimators between the policy and the reference, from sampled tokens.

Shapes: ``B`` sequences, ``T`` response tokens; ``mask`` [B, T] is 1 on real response tokens.
Padded positions may hold any value, NaN and inf included: they are replaced before any
arithmetic (``torch.where``, never a multiplication by the mask), so neither the outputs nor the
gradients depend on them, and per-token outputs are exactly 0 there.

Reference: J. Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
With tokens sampled from the policy π and r = π_ref(a|s) / π(a|s):

- k1 = -log r                  unbiased for KL(π || π_ref), high variance, can be negative;
- k2 = (log r)^2 / 2           biased, low variance, its gradient is the KL's gradient to first order;
- k3 = (r - 1) - log r         unbiased, always >= 0, low variance (used by GRPO, Shao et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rl.masked import lookup, masked_mean, zero_padding

KLKind = Literal["k1", "k2", "k3"]

@dataclass(frozen=True)
class KLEstimate:
    """Per-token KL estimate and its mean over the real tokens."""

    per_token: Tensor  # [B, T] the estimator at each real token, 0 at padding
    mean: Tensor  # [] sum over real tokens / their count (0 when there are none)


def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: Tensor) -> Tensor:
    # With d = log r = -log_ratio: k3 = exp(d) - d - 1 = expm1(d) - d. expm1 is accurate for small d
    # and, being faithfully rounded, never falls below d, so the result is exactly >= 0 in floating point.
    d = -log_ratio
    return torch.expm1(d) - d


# The config literal -> estimator table. Each maps log π(a|s) - log π_ref(a|s) to the estimate.
KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kind: KLKind = "k3") -> KLEstimate:
    """Estimate KL(π || π_ref) at the sampled tokens (Schulman 2020, estimators k1, k2, k3).

    Args:
        logprobs: [B, T] log π(a_t|s_t) of the sampled tokens under the policy. Gradients flow here.
        ref_logprobs: [B, T] log π_ref(a_t|s_t) under the reference. Detached: no gradient reaches it.
        mask: [B, T] 1 on real response tokens, 0 on padding (bool, int or float).
        kind: "k1" = logp - ref; "k2" = (logp - ref)^2 / 2; "k3" = exp(ref - logp) - (ref - logp) - 1.

    Returns:
        KLEstimate(per_token [B, T], 0 at padding; mean [], over the real tokens of the batch).
    """
    estimator = lookup(KL_ESTIMATORS, kind, "KL estimator")
    real = mask.bool()
    log_ratio = zero_padding(logprobs, real) - zero_padding(ref_logprobs.detach(), real)
    per_token = zero_padding(estimator(log_ratio), real)
    return KLEstimate(per_token=per_token, mean=masked_mean(per_token, real))
