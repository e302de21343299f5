"""Value role: the critic (LM trunk + scalar head) that trains itself on returns.

`quartet serve value --model PATH --checkpoint-dir DIR` loads the trunk of a local checkpoint and
answers `quartet.v1.Value` (Values, TrainStep, Save, Load, GetInfo). model.py holds the critic,
training.py the TrainStep pieces, checkpoint.py Save/Load, backend.py ties them together with the
locks, servicer.py is the wire.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from services.common.role import RoleContext, model_limits

NAME = "value"


class Options(model_limits("Values or TrainStep", trains=True)):
    """Options of the value role (`--set options.<field>=...`): AdamW, the head, and the batching limits."""

    lr: float = Field(1e-5, gt=0, description="AdamW learning rate of the critic.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this before each optimizer step; null = no clipping.")
    head_init_std: float = Field(
        0.0, ge=0, description="Std of the value head's initial weight; 0 = zeros (a fresh critic predicts V = 0).")
    seed: int = Field(0, description="Seed of the head initialisation (when head_init_std > 0) and of minibatch shuffling.")
    max_epochs: int = Field(32, ge=1, description="Largest TrainStep.epochs accepted; more is INVALID_ARGUMENT.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}; the usual choice is [0.9, 0.999]")
        return v


def create(ctx: RoleContext, options: Options):
    """Build the (not yet loaded) value role."""
    from services.value.servicer import ValueRole

    return ValueRole(ctx, options)
