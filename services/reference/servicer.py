"""gRPC face of the reference role: decode, call ReferenceBackend, encode. No logic of its own.

Errors are raised as QuartetError subclasses (InvalidArgument, NotReady, ...); the server's one
interceptor turns them into status codes.
"""

from __future__ import annotations

import grpc
import torch

from quartet.v1 import common_pb2, reference_pb2, reference_pb2_grpc
from services.common.codec import decode_sequences, encode_ragged
from services.common.errors import NotReady
from services.common.role import RoleContext, model_identity, quartet_version
from services.reference import NAME, Options
from services.reference.backend import ReferenceBackend


class ReferenceServicer(reference_pb2_grpc.ReferenceServicer):
    def __init__(self, backend: ReferenceBackend, ctx: RoleContext) -> None:
        self.backend = backend
        self.ctx = ctx

    def LogProbs(self, request: reference_pb2.LogProbsRequest, context: grpc.ServicerContext):
        rows, starts = decode_sequences(request.sequences, max_rows=self.backend.options.max_batch_sequences)
        logprobs = self.backend.logprobs(rows, starts)
        return reference_pb2.LogProbsResponse(logprobs=encode_ragged(logprobs, dtype=torch.float32))

    def GetInfo(self, request: common_pb2.GetInfoRequest, context: grpc.ServicerContext):
        info, opts = self.backend.info, self.backend.options
        if info is None:
            raise NotReady("reference model is still loading")
        return common_pb2.ServiceInfo(
            role=NAME,
            model_path=info.path,
            backend="transformers",
            dtype=str(info.dtype).removeprefix("torch."),
            device=str(info.device),
            tokenizer_fingerprint=info.tokenizer_fingerprint,
            weight_version=0,
            vocab_size=info.vocab_size,
            limits=common_pb2.Limits(
                max_batch_sequences=opts.max_batch_sequences,
                max_tokens_per_call=opts.max_tokens_per_call,
                max_queue=opts.max_concurrent,
                max_message_bytes=self.ctx.max_message_bytes,
            ),
            identity=model_identity(NAME, info.path),
            version=quartet_version(),
            last_step_id=-1,
            extra={
                "logprobs": "raw model, temperature 1, fp32 log-softmax",
                "max_batch_tokens": str(opts.max_batch_tokens),
                "max_concurrent": str(opts.max_concurrent),
            },
        )


class ReferenceRole:
    """The role object the runtime drives (services/common/role.py)."""

    service_name = "quartet.v1.Reference"
    admin_methods: frozenset[str] = frozenset()
    backend = "transformers"  # read by the runtime for quartet_service_info; the backend object is `impl`

    def __init__(self, ctx: RoleContext, options: Options) -> None:
        self.ctx = ctx
        self.impl = ReferenceBackend(ctx.model, options, ctx.registry)

    @property
    def identity(self) -> str:
        """For the runtime's quartet_service_info metric: role/checkpoint-folder@host."""
        return model_identity(NAME, self.ctx.model.path)

    def add_to_server(self, server: grpc.Server) -> None:
        reference_pb2_grpc.add_ReferenceServicer_to_server(ReferenceServicer(self.impl, self.ctx), server)

    def load(self) -> None:
        self.impl.load()

    def close(self) -> None:
        """Nothing to release: no threads, and the model goes with the process."""
