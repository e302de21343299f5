"""What a policy update reports: ``UpdateStats`` (its metrics) and the running ``Totals`` over its optimizer steps."""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor


@dataclass(frozen=True)
class UpdateStats:
    """What one policy update did; means over its optimizer steps (PPO / GRPO)."""

    policy_loss: float  # clipped surrogate without KL terms (PPO / GRPO); TRPO: its whole loss after the step
    kl_ref: float  # mean per-token KL(π || π_ref) estimate (cfg.kl_estimator) of the policy being trained
    clipfrac: float  # share of real tokens where the ratio clip was active (0 for TRPO)
    approx_kl: float  # KL(π_old || π): k3 estimate before each step (PPO / GRPO), final exact KL (TRPO)
    entropy: float  # mean next-token entropy over real tokens
    grad_norm: float  # policy gradient L2 norm before clipping
    lr: float  # optimizer learning rate (0 for TRPO: its step size is trpo_step_size)
    optimizer_steps: int  # minibatch steps taken (TRPO: 1 if accepted, else 0)
    # TRPO only; None (left out of the step log and report_to) for PPO / GRPO, where a 0 would read as "rejected"
    trpo_accepted: float | None = None  # 1 if the line search accepted a step, else 0
    trpo_backtracks: float | None = None  # trials rejected before the accepted one (all of them if none)
    trpo_step_size: float | None = None  # β scaling the natural-gradient direction
    trpo_final_kl: float | None = None  # mean KL(π_old || π_new) of the accepted step (0 if rejected)
    is_weight_mean: float | None = None  # mean truncated IS weight min(π_old / π_gen, tis_cap); None: tis_cap off
    is_truncated_fraction: float | None = None  # share of real tokens whose IS weight was cut to tis_cap
    # [B, T] log π_old taken from the loss forward, for a pending experience (complete_experience); not a metric
    old_logprobs: Tensor | None = None

    def as_dict(self) -> dict[str, float]:
        """The metrics: every float field."""
        return {f.name: float(v) for f in fields(self)
                if f.name != "old_logprobs" and (v := getattr(self, f.name)) is not None}


@dataclass
class Totals:
    """Running sums over optimizer steps (PPO / GRPO)."""

    policy_loss: float = 0.0
    clipfrac: float = 0.0
    approx_kl: float = 0.0
    entropy: float = 0.0
    kl_ref: float = 0.0
    grad_norm: float = 0.0
    is_weight_mean: float | None = None
    is_truncated: float | None = None
    steps: int = 0

    def add(self, **step: float) -> None:
        for name, value in step.items():
            if value is not None:
                setattr(self, name, (getattr(self, name) or 0.0) + value)
        self.steps += 1
