"""gRPC face of the generator: decode, call the batcher / assembler, encode.

Errors are QuartetError subclasses; the server's interceptor maps them to status codes.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import torch

from quartet.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.common.codec import RaggedTensor, decode_ragged, encode_ragged
from services.common.errors import FailedPrecondition, InvalidArgument, NotReady, Overloaded, QuartetError
from services.common.role import RoleContext, model_identity, quartet_version
from services.common.shm_weights import SharedUpdate, SharedWeightsReceiver
from services.common.weights import WeightAssembler, deserialize_chunk
from services.generator import NAME, Options
from services.generator.backend import (
    LOGPROB_MODE,
    MAX_STOP_STRINGS,
    GenerationRequest,
    GeneratorBackend,
    Limits,
    SamplingParams,
    validate_request,
)
from services.generator.batcher import Batcher, BatchResult
from services.generator.metrics import GeneratorMetrics

log = logging.getLogger(__name__)

_FINISH = {"stop": generator_pb2.FINISH_REASON_STOP, "length": generator_pb2.FINISH_REASON_LENGTH}


# Far more stop ids than any tokenizer has special tokens; the bound keeps a hostile list from being copied.
MAX_STOP_TOKEN_IDS = 1024


def decode_request(request: generator_pb2.GenerateRequest, *, max_prompts: int | None = None) -> GenerationRequest:
    """GenerateRequest -> GenerationRequest (shape checks and the sizes that must be checked before
    copying anything into Python; the other limits are validate_request's job)."""
    if len(request.prompt_ids.offsets) <= 1:
        raise InvalidArgument("prompt_ids", "no prompts: send at least one row")
    rows = decode_ragged(request.prompt_ids, field="prompt_ids", dtypes=(torch.int64, torch.int32),
                         max_rows=max_prompts, limit_name="max_prompts")
    if len(request.params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument("params.stop_token_ids", f"{len(request.params.stop_token_ids)} ids, "
                                                       f"at most {MAX_STOP_TOKEN_IDS}")
    if len(request.params.stop) > MAX_STOP_STRINGS:  # before copying them; their content is validate_request's
        raise InvalidArgument("params.stop", f"{len(request.params.stop)} stop strings, at most {MAX_STOP_STRINGS}")
    if request.prompt_text and len(request.prompt_text) != len(rows):
        raise InvalidArgument("prompt_text", f"has {len(request.prompt_text)} entries for {len(rows)} prompts; "
                                             "send one per prompt or none")
    p = request.params
    params = SamplingParams(
        n=p.n, temperature=p.temperature, top_p=p.top_p if p.top_p != 0 else 1.0, top_k=p.top_k,
        max_new_tokens=p.max_new_tokens, stop_token_ids=tuple(p.stop_token_ids), stop=tuple(p.stop),
        seed=p.seed if p.HasField("seed") else None,
    )
    return GenerationRequest([r.tolist() for r in rows.rows()], params, first_prompt=int(request.prompt_index_offset))


def encode_result(result: BatchResult, backend: GeneratorBackend, *, return_text: bool,
                  first_prompt: int = 0) -> generator_pb2.GenerateResponse:
    samples = result.samples
    ids = RaggedTensor.from_rows([s.token_ids for s in samples], dtype=torch.int64)
    lps = RaggedTensor.from_rows([s.logprobs for s in samples], dtype=torch.float32)
    return generator_pb2.GenerateResponse(
        completion_ids=encode_ragged(ids), logprobs=encode_ragged(lps),
        finish_reasons=[_FINISH[s.finish_reason] for s in samples],
        prompt_index=[first_prompt + s.prompt_index for s in samples],
        weight_version=result.weight_version,
        completion_text=[backend.decode(s.token_ids) for s in samples] if return_text else [],
        logprob_mode=LOGPROB_MODE,
    )


# How long a stream that ended without its `last` chunk waits for gRPC to report the call dead.
_SETTLE_S = 0.25


def _call_alive(context: grpc.ServicerContext, *, settle_s: float = 0.0) -> bool:
    """False once the client cancelled or the deadline passed.

    When a stream stalls until its deadline, gRPC may end the request iterator quietly a moment
    before is_active() turns False or the deadline is spent: the stream then looks merely short (no
    `last` chunk). With `settle_s` the answer waits that long for the call to be reported dead, and
    past that, while the deadline is nearer than `settle_s`, until it is spent: a stalled stream is
    then always told apart from a client that half-closed early, whose call stays alive.
    """
    end = time.monotonic() + settle_s
    while True:
        remaining = context.time_remaining()
        if not context.is_active() or (remaining is not None and remaining <= 0):
            return False
        if time.monotonic() >= end and (remaining is None or remaining > settle_s):
            return True
        time.sleep(0.005)


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    def __init__(self, role: GeneratorRole) -> None:
        self.role = role

    def Generate(self, request: generator_pb2.GenerateRequest, context: grpc.ServicerContext):
        backend, batcher = self.role.ready()
        req = decode_request(request, max_prompts=self.role.limits.max_prompts)
        validate_request(req, self.role.limits, backend.info)
        job = batcher.submit(req)
        context.add_callback(lambda: setattr(job, "cancelled", True))  # skip it if the caller left
        return encode_result(job.future.result(), backend, return_text=request.return_text,
                             first_prompt=req.first_prompt)

    def UpdateWeights(self, request_iterator, context: grpc.ServicerContext):
        return self.role.update_weights(request_iterator, context)

    def UpdateWeightsShared(self, request_iterator, context: grpc.ServicerContext):
        return self.role.update_weights_shared(request_iterator, context)

    def GetInfo(self, request: common_pb2.GetInfoRequest, context: grpc.ServicerContext):
        backend, _ = self.role.ready()
        info, opts, limits = backend.info, self.role.options, self.role.limits
        return common_pb2.ServiceInfo(
            role=NAME, model_path=info.model_path, backend=info.backend, dtype=info.dtype, device=info.device,
            tokenizer_fingerprint=info.tokenizer_fingerprint, weight_version=backend.version,
            vocab_size=info.vocab_size,
            limits=common_pb2.Limits(
                max_batch_sequences=limits.max_batch_sequences, max_tokens_per_call=limits.max_tokens_per_call,
                max_new_tokens=limits.max_new_tokens, max_samples_per_prompt=limits.max_samples_per_prompt,
                max_queue=opts.max_queue, max_message_bytes=self.role.ctx.max_message_bytes),
            identity=self.role.identity,
            version=quartet_version(), last_step_id=-1,
            extra={"logprobs": LOGPROB_MODE, "seeding": "sample j of prompt i: blake2b(seed:offset+i:j)",
                   "queue_depth": str(self.role.batcher.queue_depth if self.role.batcher else 0),
                   "max_batch_tokens": str(opts.max_batch_tokens), "max_prompts": str(limits.max_prompts),
                   "eos_token_ids": ",".join(map(str, info.eos_token_ids))},
        )


class GeneratorRole:
    """The role object the runtime drives (services/common/role.py)."""

    service_name = "quartet.v1.Generator"
    admin_methods: frozenset[str] = frozenset({"UpdateWeights", "UpdateWeightsShared"})

    def __init__(self, ctx: RoleContext, options: Options) -> None:
        self.ctx = ctx
        self.options = options
        self.metrics = GeneratorMetrics(ctx.registry)
        self.limits = Limits(
            max_prompts=options.max_prompts, max_samples_per_prompt=options.max_samples_per_prompt,
            max_new_tokens=options.max_new_tokens, max_batch_sequences=options.max_batch_sequences,
            max_tokens_per_call=options.max_batch_tokens)
        self.backend = self._make_backend()
        self.batcher: Batcher | None = None
        self.assembler: WeightAssembler | None = None
        self.shared: SharedWeightsReceiver | None = None
        self._update_lock = threading.Lock()

    @property
    def identity(self) -> str:
        """e.g. "generator/transformers:my-model@host" (GetInfo and the runtime's info metric)."""
        return model_identity(NAME, self.ctx.model.path, self.backend.name)

    def _make_backend(self) -> GeneratorBackend:
        if self.options.backend == "vllm":
            from services.generator.vllm_backend import VLLMBackend

            return VLLMBackend(self.ctx.model, self.options)
        from services.generator.transformers_backend import TransformersBackend

        return TransformersBackend(self.ctx.model, attn_implementation=self.options.attn_implementation)

    def add_to_server(self, server: grpc.Server) -> None:
        """What `add_GeneratorServicer_to_server` does, except that UpdateWeights chunks are decoded
        zero-copy (services/common/weight_wire.py): protobuf's own parse copies every payload twice."""
        servicer = GeneratorServicer(self)
        handlers = {
            "Generate": grpc.unary_unary_rpc_method_handler(
                servicer.Generate, request_deserializer=generator_pb2.GenerateRequest.FromString,
                response_serializer=generator_pb2.GenerateResponse.SerializeToString),
            "UpdateWeights": grpc.stream_unary_rpc_method_handler(
                servicer.UpdateWeights, request_deserializer=deserialize_chunk,
                response_serializer=generator_pb2.UpdateWeightsResponse.SerializeToString),
            "UpdateWeightsShared": grpc.stream_unary_rpc_method_handler(
                servicer.UpdateWeightsShared, request_deserializer=generator_pb2.SharedWeights.FromString,
                response_serializer=generator_pb2.UpdateWeightsResponse.SerializeToString),
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                servicer.GetInfo, request_deserializer=common_pb2.GetInfoRequest.FromString,
                response_serializer=common_pb2.ServiceInfo.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.service_name, handlers),))
        server.add_registered_method_handlers(self.service_name, handlers)

    def load(self) -> None:
        if self.options.torch_threads is not None:
            torch.set_num_threads(self.options.torch_threads)
        self.backend.load()
        self.assembler = WeightAssembler(self.backend.expected_weights(), aliases=self.backend.weight_aliases(),
                                         preallocate=self.options.preallocate_weight_buffers)
        self.shared = SharedWeightsReceiver(self.assembler.specs, self.assembler.aliases)
        self.metrics.weight_version.set(self.backend.version)
        self.batcher = Batcher(self.backend, max_queue=self.options.max_queue,
                               max_batch_tokens=self.options.max_batch_tokens, metrics=self.metrics)

    def ready(self) -> tuple[GeneratorBackend, Batcher]:
        if self.batcher is None:
            raise NotReady("generator model is still loading")
        return self.backend, self.batcher

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.backend.close()
        if self.shared is not None:
            with self._update_lock:
                self.shared.close()

    def _broke_off(self) -> FailedPrecondition:
        self.metrics.weight_update_failures.labels(reason="cancelled").inc()
        log.warning("UpdateWeights stream broke off (cancelled or past its deadline), version %d keeps serving",
                    self.backend.version)
        return FailedPrecondition("UpdateWeights stream was interrupted before its last chunk; "
                                  f"version {self.backend.version} keeps serving")

    def update_weights(self, chunks, context: grpc.ServicerContext) -> generator_pb2.UpdateWeightsResponse:
        """Stage a full stream, then swap it in between batches; on any failure nothing changes."""
        def receive() -> SharedUpdate:
            assert self.assembler is not None  # set by load(); _update checked ready() first (NotReady while loading)
            return SharedUpdate(self.assembler.assemble(chunks, current_version=self.backend.version,
                                                        is_active=context.is_active))

        return self._update(receive, context, transport="grpc")

    def update_weights_shared(self, messages, context: grpc.ServicerContext) -> generator_pb2.UpdateWeightsResponse:
        """The same, from the sender's shared-memory segment (services/common/shm_weights.py)."""
        if not self.options.shared_memory_weights:
            self.metrics.weight_update_failures.labels(reason="shm_disabled").inc()
            raise FailedPrecondition("shared_memory_weights: this generator takes weights only through the "
                                     "UpdateWeights stream (options.shared_memory_weights is off)")
        def receive() -> SharedUpdate:
            assert self.shared is not None  # set by load(); _update checked ready() first (NotReady while loading)
            return self.shared.receive(messages, current_version=self.backend.version, is_active=context.is_active)

        return self._update(receive, context, transport="shm")

    def _update(self, receive, context: grpc.ServicerContext, *, transport: str) -> generator_pb2.UpdateWeightsResponse:
        _, batcher = self.ready()
        if not self._update_lock.acquire(timeout=self.options.update_wait_seconds):
            self.metrics.weight_update_failures.labels(reason="busy").inc()
            raise Overloaded("another weight update is still in progress; retry after it finishes")
        try:
            t0 = time.perf_counter()
            try:
                update: SharedUpdate = receive()
            except QuartetError as e:
                short = isinstance(e, InvalidArgument) and e.field == "last"
                if not _call_alive(context, settle_s=_SETTLE_S if short else 0.0):
                    raise self._broke_off() from e
                reason = type(e).__name__ if transport == "grpc" else f"shm_{type(e).__name__}"
                self.metrics.weight_update_failures.labels(reason=reason).inc()
                log.warning("weight update (%s) refused, version %d keeps serving: %s", transport,
                            self.backend.version, e)
                raise
            except grpc.RpcError as e:  # the request iterator raises this when the client cancels
                raise self._broke_off() from e
            try:
                staged = update.staged
                if staged is None:  # a shared-memory probe: the segment opened; nothing to apply
                    return generator_pb2.UpdateWeightsResponse(version=self.backend.version)
                t1 = time.perf_counter()
                batcher.apply_weights(staged.tensors, staged.version)
                done = time.perf_counter()
            finally:
                update.release()
        finally:
            self._update_lock.release()
        self.metrics.weight_update_seconds.observe(done - t0)
        self.metrics.weight_update_bytes.inc(staged.nbytes)
        self.metrics.weight_updates.labels(transport=transport).inc()
        log.info("weights version %d applied (%s): %d tensors, %d bytes, %.3f s receive, %.3f s swap",
                 staged.version, transport, len(staged.tensors), staged.nbytes, t1 - t0, done - t1)
        return generator_pb2.UpdateWeightsResponse(version=staged.version, tensors_updated=len(staged.tensors),
                                                   bytes_received=staged.nbytes, apply_seconds=done - t1)
