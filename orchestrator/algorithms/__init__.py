"""The RL math of Quartet as pure torch functions: advantages, KL estimators, losses and TRPO.

No I/O and no config objects: each variant is chosen through a small table from a config literal to
a function (``KL_ESTIMATORS``, ``GROUP_SCALES``, ``AGGREGATIONS``).
"""

from orchestrator.algorithms.advantages import (
    GROUP_SCALES,
    GAEOutput,
    GroupScale,
    gae,
    group_advantages,
    masked_whiten,
    token_rewards,
)
from orchestrator.algorithms.kl import KL_ESTIMATORS, KLEstimate, KLKind, kl_estimate
from orchestrator.algorithms.losses import (
    AGGREGATIONS,
    Aggregation,
    GRPOLossOutput,
    PolicyLossOutput,
    ValueLossOutput,
    aggregate,
    grpo_loss,
    policy_loss,
    value_loss,
)
from orchestrator.algorithms.trpo import (
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
    "make_fisher_vector_product",
    "masked_whiten",
    "math_attention",
    "mean_categorical_kl",
    "policy_loss",
    "token_rewards",
    "trpo_step",
    "value_loss",
]
