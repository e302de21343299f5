"""Reference role: the frozen starting policy, serving LogProbs for the KL term.

`quartet serve reference --model PATH` loads a local causal LM checkpoint and answers
`quartet.v1.Reference` (LogProbs, GetInfo). See backend.py for the computation and servicer.py for
the wire.
"""

from __future__ import annotations

from services.common.role import RoleContext, model_limits

NAME = "reference"


class Options(model_limits("LogProbs")):
    """Options of the reference role (`--set options.<field>=...`): its batching and admission limits."""


def create(ctx: RoleContext, options: Options):
    """Build the (not yet loaded) reference role."""
    from services.reference.servicer import ReferenceRole

    return ReferenceRole(ctx, options)
