"""What the roles that serve one model over whole prompt ++ response rows share: reference and value.

Both load a local checkpoint once, check a batch against the same limits (`model_limits` in
services/common/role.py), micro-batch it with the same right-padding, and answer GetInfo alike;
they differ in what the forward pass returns (log-probabilities or values) and in whether the
weights change (the value role trains). A new role of this kind subclasses ModelBackend (its
`load` calls `_loaded`), ModelServicer in model_servicer.py (its GetInfo returns `_service_info`;
only servicers see protobuf) and ModelRole (its `add_to_server` registers the servicer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from services.common import hf
from services.common.batching import SequencesLike, check_sequences
from services.common.role import ModelConfig, RoleContext, model_identity

if TYPE_CHECKING:
    import grpc
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class LoadedModel:
    """What `load()` found, for GetInfo and the batch checks."""

    path: str
    dtype: torch.dtype
    device: torch.device
    vocab_size: int  # rows of the input embedding = width of the logits
    tokenizer_fingerprint: str
    max_positions: int | None  # config.max_position_embeddings, the longest row accepted


class ModelBackend:
    """Base of a plain (no gRPC) backend serving one model: its config, its limits, what `load` found."""

    def __init__(self, model_cfg: ModelConfig, options: Any) -> None:
        self.model_cfg = model_cfg
        self.options = options  # the role's Options, built on model_limits
        self.info: LoadedModel | None = None
        self._pad_id = 0

    def load(self) -> None:
        """Load the tokenizer and the model (slow); until it returns, calls raise NotReady."""
        raise NotImplementedError

    def _placement(self) -> tuple[str, torch.device, torch.dtype]:
        """(path, device, dtype) from the role's model config; ValueError naming what to set."""
        if not self.model_cfg.path:
            raise ValueError("model.path is not set; pass the checkpoint directory (--model PATH)")
        device = hf.resolve_device(self.model_cfg.device, field="model.device")
        dtype = hf.resolve_dtype(self.model_cfg.dtype, device=device, field="model.dtype")
        return self.model_cfg.path, device, dtype

    def _loaded(self, path: str, dtype: torch.dtype, device: torch.device, model: PreTrainedModel,
                tokenizer: PreTrainedTokenizerBase) -> None:
        """Record what `load` found: the padding id of micro-batches, and `info`."""
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.info = LoadedModel(
            path=str(path), dtype=dtype, device=device,
            vocab_size=int(model.get_input_embeddings().weight.shape[0]),
            tokenizer_fingerprint=hf.tokenizer_fingerprint(tokenizer),
            max_positions=getattr(model.config, "max_position_embeddings", None),
        )

    def _check(self, sequences: SequencesLike, response_start: Sequence[int] | Tensor,
               info: LoadedModel) -> tuple[list[Tensor], list[int]]:
        """The batch as int64 rows and response starts, within the role's limits (batching.check_sequences);
        a row may not be longer than the token budget nor than the model's positions."""
        o = self.options
        return check_sequences(
            sequences, response_start, vocab_size=info.vocab_size, max_sequences=o.max_batch_sequences,
            max_tokens=o.max_tokens_per_call,
            max_row_tokens=min(o.max_batch_tokens, info.max_positions or o.max_batch_tokens),
        )


class ModelRole:
    """The role object the runtime drives (services/common/role.py) for a service with one ModelBackend."""

    name: str  # the role's NAME, first part of its identity
    service_name: str
    admin_methods: frozenset[str] = frozenset()
    backend = "transformers"  # read by the runtime for quartet_service_info; the backend object is `impl`

    def __init__(self, ctx: RoleContext, impl: ModelBackend) -> None:
        self.ctx = ctx
        self.impl = impl

    @property
    def identity(self) -> str:
        """For the runtime's quartet_service_info metric: role/checkpoint-folder@host."""
        return model_identity(self.name, self.ctx.model.path)

    def add_to_server(self, server: grpc.Server) -> None:
        raise NotImplementedError

    def load(self) -> None:
        self.impl.load()

    def close(self) -> None:
        """Nothing to release: no threads, and the model goes with the process."""
