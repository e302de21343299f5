"""Reference role: the frozen starting policy, serving LogProbs for the KL term.

`quartet serve reference --model PATH` loads a local causal LM checkpoint and answers
`quartet.v1.Reference` (LogProbs, GetInfo). See backend.py for the computation and servicer.py for
the wire.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from services.common.role import RoleContext

NAME = "reference"


class Options(BaseModel):
    """Options of the reference role (`--set options.<field>=...`)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_tokens: int = Field(
        4096, ge=1,
        description="Token budget of one forward pass, padding included (rows x longest row). Lower it "
                    "if LogProbs runs out of memory; it is also the longest sequence accepted.")
    max_batch_sequences: int = Field(1024, ge=1, description="Most sequences in one LogProbs call; more is INVALID_ARGUMENT.")
    max_tokens_per_call: int = Field(
        262144, ge=1, description="Most tokens (prompt + response, all rows) in one LogProbs call; more is INVALID_ARGUMENT.")
    max_concurrent: int = Field(
        4, ge=1, description="LogProbs calls running at once; one more gets RESOURCE_EXHAUSTED (retry with backoff).")
    attn_implementation: str | None = Field(
        None, description="transformers attention kernel (e.g. 'eager', 'sdpa'); unset = the model's default.")


def create(ctx: RoleContext, options: Options):
    """Build the (not yet loaded) reference role."""
    from services.reference.servicer import ReferenceRole

    return ReferenceRole(ctx, options)
