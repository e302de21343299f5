"""The algorithm part of the run config: which update (PPO, GRPO, TRPO), which advantage estimator,
KL to the reference, and every hyper-parameter of the update.

Algorithm and advantage estimator are independent (DESIGN.md): GRPO's loss on GAE advantages, or
TRPO on group z-scores, are legal combinations. Fields left unset take the defaults of the chosen
algorithm from ``ALGORITHM_DEFAULTS``; a field set explicitly always wins.

Why these defaults:
- ppo: GAE with a critic, the KL as a per-token reward penalty (k1, the Ziegler et al. 2019 shaped
  reward), token-mean loss, value clip 0.2, advantage whitening, 4 epochs over the batch (TRL's
  ``num_ppo_epochs``): PPO as in InstructGPT / TRL / OpenRLHF.
- grpo: group z-score advantages, the k3 KL in the loss with beta 0.04, per-sequence mean then batch
  mean (DeepSeekMath eq. 3), one epoch (TRL's ``num_iterations=1``): GRPO as published.
- trpo: group z-score advantages. The literature pairs TRPO with GAE, but TRPO takes exactly one
  trust-region step per batch, so the direction is only as good as the advantages: with an outcome
  reward on the last token and a critic that starts untrained, GAE advantages are mostly critic noise
  for the first steps, while G samples per prompt give a low-variance baseline with no critic at all
  (and a run without a value service). Set ``advantage: gae`` for the textbook form. KL to the
  reference as a reward penalty (k1), as PPO: the trust region bounds each step, not the drift.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rl.advantages import GroupScale
from rl.kl import KLKind
from rl.losses import Aggregation

AlgorithmName = Literal["ppo", "grpo", "trpo"]
AdvantageKind = Literal["gae", "group_zscore"]
KLPlacement = Literal["reward", "loss"]
OldLogprobSource = Literal["trainer", "generator"]

# Per-algorithm defaults for fields the user leaves unset. Every key must be a field below.
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {
        "advantage": "gae",
        "kl_estimator": "k1",
        "kl_coef": 0.05,
        "kl_placement": "reward",
        "aggregation": "token_mean",
        "whiten_advantages": True,
        "epochs": 4,
    },
    "grpo": {
        "advantage": "group_zscore",
        "kl_estimator": "k3",
        "kl_coef": 0.04,
        "kl_placement": "loss",
        "aggregation": "seq_mean_token_mean",
        "whiten_advantages": False,
        "epochs": 1,
    },
    "trpo": {
        "advantage": "group_zscore",
        "kl_estimator": "k1",
        "kl_coef": 0.05,
        "kl_placement": "reward",
        "aggregation": "token_mean",
        "whiten_advantages": False,
        "epochs": 1,
    },
}

DEFAULT_ALGORITHM: AlgorithmName = "grpo"


def _per_algorithm(field: str) -> str:
    """Help-text suffix listing a field's default for each algorithm, built from the table (no drift)."""
    return (
        "Default per algorithm: "
        + ", ".join(f"{a}: {d[field]!r}" for a, d in ALGORITHM_DEFAULTS.items())
        + "."
    )


def _grpo(field: str) -> Any:
    return ALGORITHM_DEFAULTS[DEFAULT_ALGORITHM][field]


class AlgorithmConfig(BaseModel):
    """How the orchestrator turns a scored rollout into a policy update."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AlgorithmName = Field(
        DEFAULT_ALGORITHM,
        description="Policy update: 'ppo' (clipped surrogate, minibatch epochs), 'grpo' (clipped surrogate "
        "+ k3 KL in the loss) or 'trpo' (natural gradient with a KL trust region and line search).",
    )
    advantage: AdvantageKind = Field(
        _grpo("advantage"),
        description="Advantage estimator: 'gae' (needs the value service) or 'group_zscore' (G samples per "
        "prompt, no critic). " + _per_algorithm("advantage"),
    )
    group_scale: GroupScale = Field(
        "group",
        description="group_zscore normalisation: 'group' (divide by the group's std, GRPO), 'batch' (by the "
        "batch std) or 'none' (mean-centred only, Dr. GRPO).",
    )
    kl_estimator: KLKind = Field(
        _grpo("kl_estimator"),
        description="Estimator of KL(policy || reference) per sampled token: 'k1' (log-ratio), 'k2' "
        "(squared log-ratio / 2) or 'k3' (always >= 0). " + _per_algorithm("kl_estimator"),
    )
    kl_coef: float = Field(
        _grpo("kl_coef"),
        ge=0.0,
        description="Weight of the KL to the reference (beta). 0 turns it off and makes the reference "
        "service optional. " + _per_algorithm("kl_coef"),
    )
    kl_placement: KLPlacement = Field(
        _grpo("kl_placement"),
        description="Where the KL enters: 'reward' (a per-token penalty in the rewards before advantages, "
        "PPO style) or 'loss' (a term of the loss, GRPO style). " + _per_algorithm("kl_placement"),
    )
    lr: float = Field(1e-6, gt=0.0, description="AdamW learning rate of the policy (PPO and GRPO).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay of the policy.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Clip the policy gradient to this global L2 norm.")
    epochs: int = Field(
        _grpo("epochs"),
        ge=1,
        description="Passes over each batch (PPO / GRPO); TRPO always takes one step per batch. "
        + _per_algorithm("epochs"),
    )
    minibatch_size: int = Field(
        0, ge=0, description="Sequences per optimizer step (PPO / GRPO); 0 = the whole batch in one step."
    )
    clip_low: float = Field(
        0.2, ge=0.0, lt=1.0, description="The probability ratio is clipped below at 1 - clip_low."
    )
    clip_high: float = Field(
        0.2,
        ge=0.0,
        description="The ratio is clipped above at 1 + clip_high (DAPO's clip-higher: e.g. 0.28).",
    )
    dual_clip: float | None = Field(
        None,
        gt=1.0,
        description="Dual-clip constant c > 1 bounding the loss of negative-advantage tokens (PPO only); "
        "null disables it.",
    )
    value_clip: float | None = Field(
        0.2,
        gt=0.0,
        description="Clip radius of the critic's value loss around its rollout-time values (sent with "
        "Value.TrainStep); null = unclipped.",
    )
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="GAE discount over response tokens.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda (1 = Monte Carlo, 0 = TD(0)).")
    aggregation: Aggregation = Field(
        _grpo("aggregation"),
        description="How per-token losses become one number: 'token_mean' (over all real tokens), "
        "'seq_mean_token_mean' (per sequence, then over sequences) or 'seq_mean_token_sum_norm' "
        "(sum / (sequences x max length), Dr. GRPO). " + _per_algorithm("aggregation"),
    )
    whiten_advantages: bool = Field(
        _grpo("whiten_advantages"),
        description="Whiten advantages over the batch's real tokens (zero mean, unit variance) before the "
        "update. " + _per_algorithm("whiten_advantages"),
    )
    entropy_coef: float = Field(
        0.0, ge=0.0, description="Weight of an entropy bonus in the loss (PPO / GRPO / TRPO); 0 = off."
    )
    old_logprobs: OldLogprobSource = Field(
        "trainer",
        description="Source of the old (behaviour) log-probs in the ratio: 'trainer' recomputes them with "
        "the trainer's policy copy (exactly on-policy ratios), 'generator' uses the sampler's (cheaper on "
        "big models, but sampler/trainer numerics enter the ratio). The gap is logged either way.",
    )
    reuse_loss_forward: bool = Field(
        True,
        description="When the update is one optimizer step on fresh samples (PPO / GRPO, epochs 1, one minibatch, "
        "old_logprobs: trainer, the KL not in the reward), take the old log-probs from the loss forward itself "
        "(detached: the ratio is exactly 1) and skip the separate no-grad log-prob pass; the generator-vs-trainer "
        "gap and kl_ref are then measured on that forward. false: always run the separate pass.",
    )
    micro_batch_tokens: int = Field(
        16384, ge=1,
        description="Most padded tokens (rows x longest row) in one forward pass of the trainer; a minibatch over "
        "this is split and its gradients accumulated, so the trainer's memory stays bounded as completions grow "
        "(as veRL's ppo_max_token_len_per_gpu). The activations of a pass grow with it: SmolLM2-135M (49k-token "
        "vocabulary, fp32) takes ~1.8 MB a token, so one GRPO update of 16 x 330 tokens peaked at 11.5 GiB with "
        "16384, 5.9 GiB with 2048 and 2.6 GiB with 512 (same gradients). Above one pass, the loss forward can no "
        "longer double as the old-log-prob pass (reuse_loss_forward), which then costs a forward of its own.",
    )
    tis_cap: float | None = Field(
        None,
        gt=0.0,
        description="Truncated importance sampling: each token's policy loss is weighted by min(π_old / π_gen, "
        "tis_cap), π_gen being the generator's log-probs of the samples, which correct for samples drawn by "
        "other weights (rollout.pipeline) or other numerics (a bf16 sampler). null: off, except that "
        "rollout.pipeline uses 2.0 unless set. No effect with old_logprobs: generator (the weight is then 1).",
    )
    trpo_max_kl: float = Field(0.01, gt=0.0, description="TRPO trust region: mean KL(old || new) per token.")
    trpo_cg_iters: int = Field(10, ge=1, description="TRPO conjugate-gradient iterations.")
    trpo_damping: float = Field(0.1, ge=0.0, description="TRPO damping added to the Fisher matrix.")
    trpo_backtrack_coef: float = Field(
        0.8, gt=0.0, lt=1.0, description="TRPO line search: each trial shrinks the step by this factor."
    )
    trpo_max_backtracks: int = Field(10, ge=1, description="TRPO line search: number of trial steps.")
    trpo_fisher_fraction: float = Field(
        1.0, gt=0.0, le=1.0,
        description="TRPO: share of the batch's sequences (every k-th, k = round(1 / fraction)) whose KL "
        "Hessian the conjugate gradient uses. Each Fisher-vector product costs a backward pass over those rows, "
        "so 0.25 makes the CG about 4x cheaper; the trust region is still checked on the whole batch. "
        "OpenAI Baselines' TRPO uses 0.2.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_algorithm_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("name", DEFAULT_ALGORITHM)
        if name not in ALGORITHM_DEFAULTS:
            return data  # the Literal check on `name` reports it with the choices
        return {**ALGORITHM_DEFAULTS[name], **data}

    @model_validator(mode="after")
    def _check_combinations(self) -> AlgorithmConfig:
        if (
            self.name == "grpo"
            and self.kl_placement == "loss"
            and self.kl_estimator != "k3"
            and self.kl_coef > 0
        ):
            raise ValueError(
                "algorithm grpo puts the k3 estimator in its loss (DeepSeekMath eq. 4), but kl_estimator "
                f"is {self.kl_estimator!r}: set kl_estimator: k3, or kl_placement: reward, or use "
                "algorithm: ppo with kl_placement: loss for a k1/k2 loss term"
            )
        if self.name == "grpo" and self.dual_clip is not None:
            raise ValueError("dual_clip is a PPO option: unset dual_clip, or use algorithm: ppo")
        return self

    @classmethod
    def defaults_for(cls, name: AlgorithmName, **overrides: Any) -> AlgorithmConfig:
        """The config of algorithm ``name`` with its defaults, plus ``overrides``."""
        return cls(name=name, **overrides)

    @property
    def needs_values(self) -> bool:
        """True when the value service (critic) is required: GAE advantages."""
        return self.advantage == "gae"

    def old_logprobs_from_update(self, num_sequences: int) -> bool:
        """True when a separate old-log-prob pass is redundant and skipped (``reuse_loss_forward``): the
        update takes exactly one optimizer step (PPO / GRPO, one epoch, one minibatch of the
        ``num_sequences`` samples) on samples of the policy as it is, so log π_old = the detached log-probs
        of the loss forward and the ratio is exactly 1; and nothing before the update needs them
        (old_logprobs: trainer with the KL in the reward would put them into the advantages)."""
        one_step = self.epochs == 1 and (self.minibatch_size == 0 or self.minibatch_size >= num_sequences)
        kl_in_advantages = self.kl_placement == "reward" and self.kl_coef > 0
        return (self.reuse_loss_forward and self.name in ("ppo", "grpo") and one_step
                and self.old_logprobs == "trainer" and not kl_in_advantages)

    @property
    def needs_reference(self) -> bool:
        """True when reference log-probs are required: a non-zero KL coefficient."""
        return self.kl_coef > 0
