"""gRPC face of the reward role: decode a ScoreRequest, call the backend, encode the response.

Errors are QuartetError subclasses; the server's interceptor maps them to status codes.
"""

from __future__ import annotations

import socket
import threading
from importlib import metadata

import grpc
import torch

from quartet.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common.batching import CallGate
from services.common.codec import RaggedTensor, check_row_limit, decode_ragged, encode_ragged, encode_tensor
from services.common.errors import InvalidArgument, NotReady
from services.common.role import RoleContext
from services.reward import NAME
from services.reward.backend import RewardBackend, RewardBatch, RewardMetrics
from services.reward.options import Options

_INFO_FIELDS = ("model_path", "dtype", "device", "tokenizer_fingerprint")


def _version() -> str:
    try:
        return metadata.version("quartet-rl")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def decode_request(request: reward_pb2.ScoreRequest, *, max_batch: int | None = None) -> RewardBatch:
    """ScoreRequest -> RewardBatch; InvalidArgument naming the field for malformed or disagreeing fields.

    max_batch: the most samples B accepted. Every repeated field's length is compared with it before
    anything is copied, so a request of a million empty samples is refused without building them.
    B is the number of completions (every backend needs them), so they are checked first; another
    field over the limit is named unless the completions are missing, which is then the error.
    """
    b = len(request.completion_text)
    check_row_limit(b, field="completion_text", max_rows=max_batch, limit_name="max_batch", noun="samples")
    counts = {"prompt_text": len(request.prompt_text), "metadata": len(request.metadata)}
    counts.update({f"{name}.offsets": len(getattr(request, name).offsets) - 1
                   for name in ("completion_ids", "prompt_ids") if request.HasField(name)})
    for name, n in counts.items():
        if max_batch is not None and n > max_batch and b == 0:
            raise InvalidArgument("completion_text", f"not sent, and {name} describes {n} samples, over the "
                                  f"limit max_batch={max_batch}; send one completion per sample")
        check_row_limit(n, field=name, max_rows=max_batch, limit_name="max_batch", noun="samples")
    ids: dict[str, list[torch.Tensor] | None] = {}
    for name in ("prompt_ids", "completion_ids"):
        if request.HasField(name):
            rows = decode_ragged(getattr(request, name), field=name, dtypes=(torch.int64, torch.int32),
                                 max_rows=max_batch)
            ids[name] = [r.to(torch.int64) for r in rows.rows()]
        else:
            ids[name] = None
    return RewardBatch.build(
        prompt_text=list(request.prompt_text), completion_text=list(request.completion_text),
        prompt_ids=ids["prompt_ids"], completion_ids=ids["completion_ids"],
        metadata=[dict(m.values) for m in request.metadata], want_token_rewards=request.want_token_rewards,
    )


class RewardServicer(reward_pb2_grpc.RewardServicer):
    def __init__(self, role: RewardRole) -> None:
        self.role = role

    def Score(self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext) -> reward_pb2.ScoreResponse:
        backend = self.role.ready()
        batch = decode_request(request, max_batch=backend.max_batch)
        with self.role.gate.enter():
            rewards, failed, token_rewards = backend.score(batch)
        response = reward_pb2.ScoreResponse(rewards=encode_tensor(rewards), failed=failed,
                                            identity=self.role.identity)
        if token_rewards is not None:
            response.token_rewards.CopyFrom(encode_ragged(RaggedTensor.from_rows(token_rewards, dtype=torch.float32)))
        return response

    def GetInfo(self, request: common_pb2.GetInfoRequest, context: grpc.ServicerContext) -> common_pb2.ServiceInfo:
        backend = self.role.ready()
        info = backend.info()
        extra = {k: v for k, v in info.items() if k not in _INFO_FIELDS}
        extra["kind"] = backend.kind
        extra["max_concurrent"] = str(self.role.options.max_concurrent)
        return common_pb2.ServiceInfo(
            role=NAME, model_path=info.get("model_path", backend.identity), backend=backend.identity,
            dtype=info.get("dtype", ""), device=info.get("device", "cpu"),
            tokenizer_fingerprint=info.get("tokenizer_fingerprint", ""),
            limits=common_pb2.Limits(max_batch_sequences=backend.max_batch, max_queue=self.role.options.max_concurrent,
                                     max_message_bytes=self.role.ctx.max_message_bytes),
            identity=self.role.identity, version=_version(), last_step_id=-1, extra=extra,
        )


def build_backend(ctx: RoleContext, options: Options, metrics: RewardMetrics) -> RewardBackend:
    """The backend named by options.kind, started (worker processes up, model loaded)."""
    if options.kind == "model":
        from services.reward.model import ModelBackend

        return ModelBackend(ctx.model, options, metrics)
    from services.reward.pooled import PluginBackend, RuleBackend

    backend = RuleBackend(options, metrics) if options.kind == "rule" else PluginBackend(options, metrics)
    backend.start()
    return backend


class RewardRole:
    """The role object the runtime drives (services/common/role.py)."""

    service_name = "quartet.v1.Reward"
    admin_methods: frozenset[str] = frozenset()

    def __init__(self, ctx: RoleContext, options: Options) -> None:
        self.ctx = ctx
        self.options = options
        self.metrics = RewardMetrics(ctx.registry)
        self.gate = CallGate(options.max_concurrent, "reward Score")
        self.backend_impl: RewardBackend | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        """Backend identity, e.g. "rule:arithmetic" (read by the runtime for its info metric)."""
        return self.backend_impl.identity if self.backend_impl is not None else ""

    @property
    def identity(self) -> str:
        """Service identity, as in GetInfo and every ScoreResponse: "reward/rule:arithmetic@host"."""
        return f"{NAME}/{self.backend}@{socket.gethostname()}"

    def add_to_server(self, server: grpc.Server) -> None:
        reward_pb2_grpc.add_RewardServicer_to_server(RewardServicer(self), server)

    def load(self) -> None:
        backend = build_backend(self.ctx, self.options, self.metrics)
        with self._lock:
            if not self._closed:
                self.backend_impl = backend
                return
        backend.close()  # stopped while loading: do not leave worker processes behind

    def ready(self) -> RewardBackend:
        if self.backend_impl is None:
            raise NotReady("reward backend is still loading")
        return self.backend_impl

    def close(self) -> None:
        with self._lock:
            self._closed = True
            backend = self.backend_impl
        if backend is not None:
            backend.close()
