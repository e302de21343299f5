"""A test fixture role for the runtime tests: a fake Generator that echoes prompts reversed.

Not a product: it exists so the server runtime (auth, health, metrics, shutdown) can be tested with
real gRPC before, and independently of, the real roles. It covers a unary call (Generate), a
client-streaming admin call (UpdateWeights) and GetInfo. Served by name as a custom role:

    quartet serve tests.integration.echo_role

Test hooks: invocation metadata `x-sleep` (seconds) makes Generate slow; request_id "boom" raises
a plain exception, "abort" aborts with FAILED_PRECONDITION; Options can delay or fail load().
"""

from __future__ import annotations

import threading
import time

import grpc
import torch
from pydantic import BaseModel, ConfigDict, Field

from quartet.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.common.codec import decode_ragged, encode_ragged
from services.common.errors import NotReady
from services.common.role import RoleContext

NAME = "echo"
STREAM_SERVICE = "quartet.test.Echo"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    load_seconds: float = Field(0.0, ge=0, description="Sleep this long in load().")
    block_load: bool = Field(False, description="load() waits until the test sets role.release.")
    fail_load: bool = Field(False, description="load() raises.")
    max_queue: int = Field(8, gt=0, description="Reported in GetInfo limits.")


class EchoRole(generator_pb2_grpc.GeneratorServicer):
    service_name = "quartet.v1.Generator"
    admin_methods = frozenset({"UpdateWeights"})
    backend = "echo"      # read by the runtime for the quartet_service_info metric
    identity = "echo@test"

    def __init__(self, ctx: RoleContext, options: Options) -> None:
        self.ctx = ctx
        self.options = options
        self.release = threading.Event()
        self.loaded = False
        self.closed = False
        self.version = 0

    # -- Role contract --
    def add_to_server(self, server: grpc.Server) -> None:
        generator_pb2_grpc.add_GeneratorServicer_to_server(self, server)
        # A raw-bytes server-streaming method, so the runtime's streaming-response path is tested too.
        handler = grpc.unary_stream_rpc_method_handler(self.Count)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(STREAM_SERVICE, {"Count": handler}),))

    def Count(self, request: bytes, context):  # type: ignore[no-untyped-def]
        """Streams b"0", b"1", ... b"n-1" for request b"n"; fails after 2 items when n is 13."""
        n = int(request)
        for i in range(n):
            if n == 13 and i == 2:
                raise ValueError("unlucky")
            yield str(i).encode()

    def load(self) -> None:
        if self.options.block_load and not self.release.wait(30):
            raise TimeoutError("test never released load()")
        time.sleep(self.options.load_seconds)
        if self.options.fail_load:
            raise RuntimeError("load failed on purpose")
        self.loaded = True

    def close(self) -> None:
        self.closed = True

    # -- Generator service --
    def Generate(self, request, context):  # type: ignore[no-untyped-def]
        if not self.loaded:
            raise NotReady("echo role is loading")
        sleep = dict(context.invocation_metadata()).get("x-sleep")
        if sleep:
            time.sleep(float(sleep))
        if request.request_id == "boom":
            raise KeyError("secret detail that must not reach the client")
        if request.request_id == "abort":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "aborted on purpose")
        prompts = decode_ragged(request.prompt_ids, field="prompt_ids", dtypes=(torch.int64, torch.int32))
        n = max(1, request.params.n)
        rows = [row.flip(0).to(torch.int64) for row in prompts.rows() for _ in range(n)]
        return generator_pb2.GenerateResponse(
            completion_ids=encode_ragged(rows, dtype=torch.int64),
            logprobs=encode_ragged([torch.zeros(len(r)) for r in rows], dtype=torch.float32),
            finish_reasons=[generator_pb2.FINISH_REASON_LENGTH] * len(rows),
            prompt_index=[i for i in range(len(prompts)) for _ in range(n)],
            weight_version=self.version,
            logprob_mode="raw",
        )

    def UpdateWeights(self, request_iterator, context):  # type: ignore[no-untyped-def]
        received, version = 0, self.version
        for chunk in request_iterator:
            version = chunk.version
            received += sum(len(p.data) for p in chunk.pieces)
        self.version = version
        return generator_pb2.UpdateWeightsResponse(version=version, bytes_received=received)

    def GetInfo(self, request, context):  # type: ignore[no-untyped-def]
        return common_pb2.ServiceInfo(
            role="generator", model_path=self.ctx.model.path or "", backend=self.backend,
            dtype="float32", device="cpu", tokenizer_fingerprint="f" * 64, weight_version=self.version,
            identity=self.identity, version="test",
            limits=common_pb2.Limits(max_queue=self.options.max_queue, max_message_bytes=self.ctx.max_message_bytes),
        )


def create(ctx: RoleContext, options: Options) -> EchoRole:
    return EchoRole(ctx, options)


# -- helpers for the tests that use this role --
ROLE = __name__


def generate_request(rows: list[list[int]] | None = None, *, n: int = 1, request_id: str = "") -> generator_pb2.GenerateRequest:
    rows = [[1, 2, 3]] if rows is None else rows
    return generator_pb2.GenerateRequest(
        prompt_ids=encode_ragged([torch.tensor(r, dtype=torch.int64) for r in rows], dtype=torch.int64),
        params=generator_pb2.SamplingParams(n=n, max_new_tokens=4), request_id=request_id,
    )


def weight_chunks(version: int, n: int = 3) -> list[generator_pb2.WeightChunk]:
    piece = generator_pb2.WeightPiece(name="w", dtype=common_pb2.DTYPE_FLOAT32, shape=[4], data=b"\0" * 16)
    return [generator_pb2.WeightChunk(version=version, pieces=[piece], last=i == n - 1) for i in range(n)]
