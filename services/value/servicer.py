"""gRPC face of the value role: decode, call ValueBackend, encode. No logic of its own.

Errors are raised as QuartetError subclasses; the server's one interceptor maps them to status codes.
TrainStep, Save and Load are admin methods: the runtime checks the admin token before they run.
"""

from __future__ import annotations

import grpc
import torch

from quartet.v1 import common_pb2, value_pb2, value_pb2_grpc
from services.common.codec import RaggedTensor, decode_ragged, encode_ragged
from services.common.errors import InvalidArgument
from services.common.model_role import ModelRole
from services.common.model_servicer import ModelServicer
from services.common.role import RoleContext
from services.value import NAME, Options
from services.value.backend import ValueBackend

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _floats(msg: common_pb2.Ragged, field: str, rows: int) -> RaggedTensor:
    return decode_ragged(msg, field=field, dtypes=_FLOATS, rows=rows)


class ValueServicer(ModelServicer, value_pb2_grpc.ValueServicer):
    role = NAME
    backend: ValueBackend

    def Values(self, request: value_pb2.ValuesRequest, context: grpc.ServicerContext):
        rows, starts = self._sequences(request.sequences)
        out = self.backend.values(rows, starts)
        return value_pb2.ValuesResponse(values=encode_ragged(out.values, dtype=torch.float32),
                                        steps_trained=out.steps_trained)

    def TrainStep(self, request: value_pb2.TrainStepRequest, context: grpc.ServicerContext):
        rows, starts = self._sequences(request.sequences)
        if not request.HasField("returns"):
            raise InvalidArgument("returns", "required: one row of return targets per sequence")
        b = len(rows)
        old = _floats(request.old_values, "old_values", b) if request.HasField("old_values") else None
        mask = _floats(request.mask, "mask", b) if request.HasField("mask") else None
        out = self.backend.train_step(
            rows, starts, _floats(request.returns, "returns", b), old, mask,
            step_id=request.step_id,
            clip_range=request.clip_range if request.HasField("clip_range") else None,
            epochs=request.epochs, minibatch_size=request.minibatch_size,
        )
        return value_pb2.TrainStepResponse(
            loss=out.loss, clip_fraction=out.clip_fraction, explained_variance=out.explained_variance,
            grad_norm=out.grad_norm, duplicate=out.duplicate, steps_trained=out.steps_trained,
            last_step_id=out.last_step_id,
        )

    def Save(self, request: value_pb2.SaveRequest, context: grpc.ServicerContext):
        out = self.backend.save(request.name)
        return value_pb2.SaveResponse(path=out.path, steps_trained=out.steps_trained, last_step_id=out.last_step_id)

    def Load(self, request: value_pb2.LoadRequest, context: grpc.ServicerContext):
        out = self.backend.load_checkpoint(request.name)
        return value_pb2.LoadResponse(steps_trained=out.steps_trained, last_step_id=out.last_step_id)

    def GetInfo(self, request: common_pb2.GetInfoRequest, context: grpc.ServicerContext):
        backend, opts = self.backend, self.backend.options
        extra = {
            "values": "V(state before each response token): head(hidden[k-1]) for token k",
            "loss": "PPO clipped value loss, token mean",
            "lr": repr(opts.lr),
            "max_batch_tokens": str(opts.max_batch_tokens),
            "checkpoint_dir": "set" if backend.checkpoint_dir is not None else "unset",
        }
        return self._service_info(weight_version=backend.steps_trained, last_step_id=backend.last_step_id,
                                  extra=extra)


class ValueRole(ModelRole):
    """The role object the runtime drives (services/common/role.py). `close` releases nothing: unsaved
    training is lost by design (Save first)."""

    name = NAME
    service_name = "quartet.v1.Value"
    admin_methods: frozenset[str] = frozenset({"TrainStep", "Save", "Load"})

    def __init__(self, ctx: RoleContext, options: Options) -> None:
        super().__init__(ctx, ValueBackend(ctx.model, options, ctx.registry, ctx.checkpoint_dir))

    def add_to_server(self, server: grpc.Server) -> None:
        value_pb2_grpc.add_ValueServicer_to_server(ValueServicer(self.impl, self.ctx), server)
