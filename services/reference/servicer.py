"""gRPC face of the reference role: decode, call ReferenceBackend, encode. No logic of its own.

Errors are raised as QuartetError subclasses (InvalidArgument, NotReady, ...); the server's one
interceptor turns them into status codes.
"""

from __future__ import annotations

import grpc
import torch

from quartet.v1 import common_pb2, reference_pb2, reference_pb2_grpc
from services.common.codec import encode_ragged
from services.common.model_role import ModelRole
from services.common.model_servicer import ModelServicer
from services.common.role import RoleContext
from services.reference import NAME, Options
from services.reference.backend import ReferenceBackend


class ReferenceServicer(ModelServicer, reference_pb2_grpc.ReferenceServicer):
    role = NAME
    backend: ReferenceBackend

    def LogProbs(self, request: reference_pb2.LogProbsRequest, context: grpc.ServicerContext):
        rows, starts = self._sequences(request.sequences)
        logprobs = self.backend.logprobs(rows, starts)
        return reference_pb2.LogProbsResponse(logprobs=encode_ragged(logprobs, dtype=torch.float32))

    def GetInfo(self, request: common_pb2.GetInfoRequest, context: grpc.ServicerContext):
        opts = self.backend.options
        extra = {
            "logprobs": "raw model, temperature 1, fp32 log-softmax",
            "max_batch_tokens": str(opts.max_batch_tokens),
            "max_concurrent": str(opts.max_concurrent),
        }
        return self._service_info(extra=extra)


class ReferenceRole(ModelRole):
    """The role object the runtime drives (services/common/role.py)."""

    name = NAME
    service_name = "quartet.v1.Reference"

    def __init__(self, ctx: RoleContext, options: Options) -> None:
        super().__init__(ctx, ReferenceBackend(ctx.model, options, ctx.registry))

    def add_to_server(self, server: grpc.Server) -> None:
        reference_pb2_grpc.add_ReferenceServicer_to_server(ReferenceServicer(self.impl, self.ctx), server)
