"""Calls to the generator that tests/integration/test_generator*.py serve: its tokens, stubs, a
Generate request and the decoded answer."""

from __future__ import annotations

import grpc
import torch

from quartet.v1 import generator_pb2, generator_pb2_grpc
from services.common.channel import open_channel
from services.common.codec import decode_ragged, encode_ragged
from services.common.server import RunningServer

CALL, ADMIN = "gen-call-token", "gen-admin-token"


def stubs(srv: RunningServer) -> tuple[generator_pb2_grpc.GeneratorStub, grpc.Channel]:
    """(call-token stub, admin channel for UpdateWeights)."""
    return (generator_pb2_grpc.GeneratorStub(open_channel(srv.address, token=CALL)),
            open_channel(srv.address, token=ADMIN))


def generate_request(prompts: list[list[int]], **params) -> generator_pb2.GenerateRequest:
    """A Generate request for `prompts`: one sample each, temperature 1, 6 new tokens, seed 11, unless `params` say."""
    params = {"n": 1, "temperature": 1.0, "max_new_tokens": 6, "seed": 11, **params}
    return generator_pb2.GenerateRequest(prompt_ids=encode_ragged([torch.tensor(p) for p in prompts], dtype=torch.int64),
                                         params=generator_pb2.SamplingParams(**params))


def sample_rows(resp: generator_pb2.GenerateResponse) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The answer's [B] token-id rows and [B] logprob rows."""
    ids = [r.tolist() for r in decode_ragged(resp.completion_ids, dtypes=(torch.int64,)).rows()]
    return ids, decode_ragged(resp.logprobs, dtypes=(torch.float32,)).rows()
