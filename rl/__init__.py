"""The RL math of Quartet as pure torch functions: advantages, KL estimators, losses and TRPO.

Imports only torch. No I/O and no config objects: each variant is chosen through a small table from
a config literal to a function (``KL_ESTIMATORS``, ``GROUP_SCALES``, ``AGGREGATIONS``). Used by the
orchestrator (the policy update) and the value service (the critic's loss).

Shapes: ``B`` sequences, ``T`` response tokens, ``G`` samples per prompt; ``mask`` [B, T] is 1 on
real response tokens.
"""

from rl.advantages import (
    GROUP_SCALES,
    GAEOutput,
    GroupScale,
    gae,
    group_advantages,
    kl_penalised_scores,
    masked_whiten,
    token_rewards,
)
from rl.kl import KL_ESTIMATORS, KLEstimate, KLKind, kl_estimate
from rl.losses import (
    AGGREGATIONS,
    Aggregation,
    GRPOLossOutput,
    PolicyLossOutput,
    ValueLossOutput,
    aggregate,
    grpo_loss,
    policy_loss,
    trpo_surrogate,
    value_loss,
)
from rl.masked import lookup, masked_mean, zero_padding
from rl.offpolicy import ISWeights, truncated_is_weights
from rl.trpo import (
    CGResult,
    TRPOResult,
    conjugate_gradient,
    fisher_vector_product,
    make_fisher_vector_product,
    math_attention,
    mean_categorical_kl,
    trpo_step,
)

__all__ = [
    "AGGREGATIONS",
    "GROUP_SCALES",
    "KL_ESTIMATORS",
    "Aggregation",
    "CGResult",
    "GAEOutput",
    "GRPOLossOutput",
    "GroupScale",
    "ISWeights",
    "KLEstimate",
    "KLKind",
    "PolicyLossOutput",
    "TRPOResult",
    "ValueLossOutput",
    "aggregate",
    "conjugate_gradient",
    "fisher_vector_product",
    "gae",
    "group_advantages",
    "grpo_loss",
    "kl_estimate",
    "kl_penalised_scores",
    "lookup",
    "make_fisher_vector_product",
    "masked_mean",
    "masked_whiten",
    "math_attention",
    "mean_categorical_kl",
    "policy_loss",
    "token_rewards",
    "trpo_step",
    "trpo_surrogate",
    "truncated_is_weights",
    "value_loss",
    "zero_padding",
]
