"""gRPC face of the value role: decode, call ValueBackend, encode. No logic of its own.

Errors are raised as QuartetError subclasses; the server's one interceptor maps them to status codes.
TrainStep, Save and Load are admin methods: the runtime checks the admin token before they run.
"""

from __future__ import annotations

import grpc
import torch

from quartet.v1 import common_pb2, value_pb2, value_pb2_grpc
from services.common.codec import RaggedTensor, decode_ragged, decode_sequences, encode_ragged
from services.common.errors import InvalidArgument, NotReady
from services.common.role import RoleContext, model_identity, quartet_version
from services.value import NAME, Options
from services.value.backend import ValueBackend

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)




def _floats(msg: common_pb2.Ragged, field: str, rows: int) -> RaggedTensor:
    return decode_ragged(msg, field=field, dtypes=_FLOATS, rows=rows)


class ValueServicer(value_pb2_grpc.ValueServicer):
    def __init__(self, backend: ValueBackend, ctx: RoleContext) -> None:
        self.backend = backend
        self.ctx = ctx

    def Values(self, request: value_pb2.ValuesRequest, context: grpc.ServicerContext):
        rows, starts = decode_sequences(request.sequences, max_rows=self.backend.options.max_batch_sequences)
        out = self.backend.values(rows, starts)
        return value_pb2.ValuesResponse(values=encode_ragged(out.values, dtype=torch.float32),
                                        steps_trained=out.steps_trained)

    def TrainStep(self, request: value_pb2.TrainStepRequest, context: grpc.ServicerContext):
        rows, starts = decode_sequences(request.sequences, max_rows=self.backend.options.max_batch_sequences)
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
        info, opts = self.backend.info, self.backend.options
        if info is None:
            raise NotReady("value model is still loading")
        return common_pb2.ServiceInfo(
            role=NAME,
            model_path=info.path,
            backend="transformers",
            dtype=str(info.dtype).removeprefix("torch."),
            device=str(info.device),
            tokenizer_fingerprint=info.tokenizer_fingerprint,
            weight_version=self.backend.steps_trained,
            vocab_size=info.vocab_size,
            limits=common_pb2.Limits(
                max_batch_sequences=opts.max_batch_sequences,
                max_tokens_per_call=opts.max_tokens_per_call,
                max_queue=opts.max_concurrent,
                max_message_bytes=self.ctx.max_message_bytes,
            ),
            identity=model_identity(NAME, info.path),
            version=quartet_version(),
            last_step_id=self.backend.last_step_id,
            extra={
                "values": "V(state before each response token): head(hidden[k-1]) for token k",
                "loss": "PPO clipped value loss, token mean",
                "lr": repr(opts.lr),
                "max_batch_tokens": str(opts.max_batch_tokens),
                "checkpoint_dir": "set" if self.backend.checkpoint_dir is not None else "unset",
            },
        )


class ValueRole:
    """The role object the runtime drives (services/common/role.py)."""

    service_name = "quartet.v1.Value"
    admin_methods: frozenset[str] = frozenset({"TrainStep", "Save", "Load"})
    backend = "transformers"  # read by the runtime for quartet_service_info; the backend object is `impl`

    def __init__(self, ctx: RoleContext, options: Options) -> None:
        self.ctx = ctx
        self.impl = ValueBackend(ctx.model, options, ctx.registry, ctx.checkpoint_dir)

    @property
    def identity(self) -> str:
        """For the runtime's quartet_service_info metric: role/checkpoint-folder@host."""
        return model_identity(NAME, self.ctx.model.path)

    def add_to_server(self, server: grpc.Server) -> None:
        value_pb2_grpc.add_ValueServicer_to_server(ValueServicer(self.impl, self.ctx), server)

    def load(self) -> None:
        self.impl.load()

    def close(self) -> None:
        """Nothing to release: no threads; unsaved training is lost by design (Save first)."""
