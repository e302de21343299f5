"""The servicer half of a role that serves one model (reference, value): the only part that sees protobuf."""

from __future__ import annotations

from quartet.v1 import common_pb2
from services.common.codec import RaggedTensor, decode_sequences
from services.common.errors import NotReady
from services.common.model_role import ModelBackend
from services.common.role import RoleContext, model_identity, quartet_version


class ModelServicer:
    """Base of a model role's servicer, listed before the generated XServicer: the backend, the runtime
    context, a request's sequences decoded under the role's limit, and GetInfo's common part."""

    role: str  # the role's NAME, reported in GetInfo

    def __init__(self, backend: ModelBackend, ctx: RoleContext) -> None:
        self.backend = backend
        self.ctx = ctx

    def _sequences(self, batch: common_pb2.SequenceBatch) -> tuple[RaggedTensor, list[int]]:
        """The batch's rows and response starts; more than max_batch_sequences rows is refused before decoding."""
        return decode_sequences(batch, max_rows=self.backend.options.max_batch_sequences)

    def _service_info(self, *, weight_version: int = 0, last_step_id: int = -1,
                      extra: dict[str, str]) -> common_pb2.ServiceInfo:
        """GetInfo: what `load` found and the role's limits; NotReady while the model loads."""
        info, opts = self.backend.info, self.backend.options
        if info is None:
            raise NotReady(f"{self.role} model is still loading")
        return common_pb2.ServiceInfo(
            role=self.role,
            model_path=info.path,
            backend="transformers",
            dtype=str(info.dtype).removeprefix("torch."),
            device=str(info.device),
            tokenizer_fingerprint=info.tokenizer_fingerprint,
            weight_version=weight_version,
            vocab_size=info.vocab_size,
            limits=common_pb2.Limits(
                max_batch_sequences=opts.max_batch_sequences,
                max_tokens_per_call=opts.max_tokens_per_call,
                max_queue=opts.max_concurrent,
                max_message_bytes=self.ctx.max_message_bytes,
            ),
            identity=model_identity(self.role, info.path),
            version=quartet_version(),
            last_step_id=last_step_id,
            extra=extra,
        )
