"""The per-minibatch objectives of the policy update: each algorithm's loss built from ``rl``.

A ``Minibatch`` is rows of an Experience on the model's device; ``Norm`` carries the normaliser
shared by every micro-batch of one optimizer step, so that micro-batch losses add up to the
minibatch's loss. ``ppo_objective``, ``grpo_objective`` and ``trpo_objective`` map the config to one
call of ``rl.losses`` each (plus the KL-in-loss and entropy terms).

Shapes: ``b`` rows, ``T`` response tokens; ``mask`` is 1 on real tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.run.algo_config import AlgorithmConfig
from orchestrator.step.experience import Experience
from orchestrator.step.policy import TokenBatch, TokenLogProbs
from rl.kl import kl_estimate
from rl.losses import aggregate, grpo_loss, policy_loss, trpo_surrogate
from rl.offpolicy import truncated_is_weights


@dataclass(frozen=True)
class Minibatch:
    """Rows of an Experience on the model's device."""

    batch: TokenBatch
    mask: Tensor  # [b, T] float
    old_logprobs: Tensor | None  # [b, T]; None until the trainer takes them from its loss forward
    ref_logprobs: Tensor | None  # [b, T]
    advantages: Tensor  # [b, T]
    generator_logprobs: Tensor | None = None  # [b, T] log π_gen of the samples (the IS weights' denominator)

    @classmethod
    def take(cls, exp: Experience, rows: Tensor | slice, device: torch.device) -> Minibatch:
        return cls(
            batch=exp.batch.rows(rows).to(device),
            mask=exp.mask[rows].to(device),
            old_logprobs=None if exp.old_logprobs is None else exp.old_logprobs[rows].to(device),
            ref_logprobs=None if exp.ref_logprobs is None else exp.ref_logprobs[rows].to(device),
            advantages=exp.advantages[rows].to(device),
            generator_logprobs=exp.generator_logprobs[rows].to(device),
        )

    def rows(self, index: Tensor | slice) -> Minibatch:
        return Minibatch(
            batch=self.batch.rows(index),
            mask=self.mask[index],
            old_logprobs=None if self.old_logprobs is None else self.old_logprobs[index],
            ref_logprobs=None if self.ref_logprobs is None else self.ref_logprobs[index],
            advantages=self.advantages[index],
            generator_logprobs=None if self.generator_logprobs is None else self.generator_logprobs[index],
        )


@dataclass(frozen=True)
class Norm:
    """Loss normalisation shared by every micro-batch of one optimizer step."""

    num_items: Tensor | int | None  # global tokens (token_mean) or sequences (the per-sequence modes)
    max_len: int  # Dr. GRPO's constant normaliser: the trainer's max_len, else the experience's T


@dataclass(frozen=True)
class LossParts:
    loss: Tensor  # [] to minimise, KL-in-loss term included
    policy_loss: Tensor  # [] surrogate part
    clipfrac: Tensor  # []
    approx_kl: Tensor  # []
    is_weight_mean: Tensor | None = None  # [] mean truncated IS weight over real tokens (None: tis_cap off)
    is_truncated: Tensor | None = None  # [] share of real tokens whose weight was cut to tis_cap


LossFn = Callable[[Tensor, Minibatch, AlgorithmConfig, Norm], LossParts]

# The aggregation literal -> what `num_items` counts in a minibatch (mask [b, T]).
NUM_ITEMS: dict[str, Callable[[Tensor], Tensor | int]] = {
    "token_mean": lambda mask: mask.sum(),
    "seq_mean_token_mean": lambda mask: mask.shape[0],
    "seq_mean_token_sum_norm": lambda mask: mask.shape[0],
}


def aggregate_like(per_token: Tensor, mb: Minibatch, cfg: AlgorithmConfig, norm: Norm) -> Tensor:
    return aggregate(per_token, mb.mask, cfg.aggregation, max_len=norm.max_len, num_items=norm.num_items)


@dataclass(frozen=True)
class _IS:
    weights: Tensor | None  # [b, T], None: no correction
    mean: Tensor | None = None
    truncated: Tensor | None = None


def is_weights(mb: Minibatch, cfg: AlgorithmConfig) -> _IS:
    """The truncated importance weights min(π_old / π_gen, tis_cap) of the minibatch (rl.offpolicy), if on."""
    if cfg.tis_cap is None or mb.generator_logprobs is None or mb.old_logprobs is None:
        return _IS(None)
    w = truncated_is_weights(mb.old_logprobs, mb.generator_logprobs, mb.mask, cap=cfg.tis_cap)
    return _IS(w.weights, w.mean, w.truncated_fraction)


def kl_loss_term(logprobs: Tensor, mb: Minibatch, cfg: AlgorithmConfig, norm: Norm) -> Tensor:
    """kl_coef x aggregated KL(π || π_ref) when the KL is placed in the loss, else 0."""
    if cfg.kl_placement != "loss" or cfg.kl_coef == 0 or mb.ref_logprobs is None:
        return logprobs.new_zeros(())
    kl = kl_estimate(logprobs, mb.ref_logprobs, mb.mask, cfg.kl_estimator).per_token
    return cfg.kl_coef * aggregate_like(kl, mb, cfg, norm)


def ppo_objective(logprobs: Tensor, mb: Minibatch, cfg: AlgorithmConfig, norm: Norm) -> LossParts:
    iw = is_weights(mb, cfg)
    out = policy_loss(
        logprobs,
        mb.old_logprobs,
        mb.advantages,
        mb.mask,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        aggregation=cfg.aggregation,
        max_len=norm.max_len,
        num_items=norm.num_items,
        dual_clip=cfg.dual_clip,
        is_weights=iw.weights,
    )
    loss = out.loss + kl_loss_term(logprobs, mb, cfg, norm)
    return LossParts(loss=loss, policy_loss=out.loss, clipfrac=out.clipfrac, approx_kl=out.approx_kl,
                     is_weight_mean=iw.mean, is_truncated=iw.truncated)


def grpo_objective(logprobs: Tensor, mb: Minibatch, cfg: AlgorithmConfig, norm: Norm) -> LossParts:
    beta = cfg.kl_coef if cfg.kl_placement == "loss" else 0.0
    # Without a reference (kl_coef = 0) the k3 term against the policy itself is exactly 0.
    ref = logprobs.detach() if mb.ref_logprobs is None else mb.ref_logprobs
    iw = is_weights(mb, cfg)
    out = grpo_loss(
        logprobs,
        mb.old_logprobs,
        ref,
        mb.advantages,
        mb.mask,
        beta=beta,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        aggregation=cfg.aggregation,
        max_len=norm.max_len,
        num_items=norm.num_items,
        is_weights=iw.weights,
    )
    return LossParts(loss=out.loss, policy_loss=out.policy_loss, clipfrac=out.clipfrac, approx_kl=out.approx_kl,
                     is_weight_mean=iw.mean, is_truncated=iw.truncated)


def trpo_objective(out: TokenLogProbs, mb: Minibatch, cfg: AlgorithmConfig, norm: Norm) -> LossParts:
    """-E[r A] (Schulman et al. 2015, eq. 14), unclipped: the trust region does the clipping's job."""
    iw = is_weights(mb, cfg)
    surrogate = trpo_surrogate(out.logprobs, mb.old_logprobs, mb.advantages, mb.mask, aggregation=cfg.aggregation,
                               max_len=norm.max_len, num_items=norm.num_items, is_weights=iw.weights)
    loss = surrogate + kl_loss_term(out.logprobs, mb, cfg, norm)
    if cfg.entropy_coef > 0 and out.entropy is not None:
        loss = loss - cfg.entropy_coef * aggregate_like(out.entropy, mb, cfg, norm)
    zero = surrogate.new_zeros(())
    return LossParts(loss=loss, policy_loss=surrogate, clipfrac=zero, approx_kl=zero, is_weight_mean=iw.mean,
                     is_truncated=iw.truncated)


def kl_ref(logprobs: Tensor, mb: Minibatch, cfg: AlgorithmConfig) -> float:
    if mb.ref_logprobs is None:
        return 0.0
    return float(kl_estimate(logprobs, mb.ref_logprobs, mb.mask, cfg.kl_estimator).mean)
