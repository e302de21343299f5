"""Value role: the critic (LM trunk + scalar head) that trains itself on returns.

`quartet serve value --model PATH --checkpoint-dir DIR` loads the trunk of a local checkpoint and
answers `quartet.v1.Value` (Values, TrainStep, Save, Load, GetInfo). model.py holds the critic,
training.py the TrainStep pieces, checkpoint.py Save/Load, backend.py ties them together with the
locks, servicer.py is the wire.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common.role import RoleContext

NAME = "value"


class Options(BaseModel):
    """Options of the value role (`--set options.<field>=...`)."""

    model_config = ConfigDict(extra="forbid")

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
    max_batch_tokens: int = Field(
        4096, ge=1,
        description="Token budget of one forward (and backward) pass, padding included (rows x longest row); "
                    "lower it if TrainStep runs out of memory. Also the longest sequence accepted.")
    max_batch_sequences: int = Field(1024, ge=1, description="Most sequences in one Values or TrainStep call; more is INVALID_ARGUMENT.")
    max_tokens_per_call: int = Field(
        262144, ge=1, description="Most tokens (prompt + response, all rows) in one call; more is INVALID_ARGUMENT.")
    max_concurrent: int = Field(
        4, ge=1,
        description="Values calls (and, separately, TrainStep calls) admitted at once; one more gets "
                    "RESOURCE_EXHAUSTED. Admitted calls still take turns on the weights.")
    attn_implementation: str | None = Field(
        None, description="transformers attention kernel of the trunk (e.g. 'eager', 'sdpa'); unset = the model's default.")

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
