"""Shared pieces of the response fuzz tests: orchestrator clients whose every RPC is answered by a stub
with a drawn response, the check that a refusal names the service, the call and the field, and
strategies for arbitrary bytes in array fields. Pure Python: no sockets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st

from orchestrator.remote.clients import GeneratorClient, ServiceError, ValueClient
from orchestrator.run.config import Endpoint
from quartet.v1 import common_pb2 as pb
from tests.fuzz.strategies import INT64_MAX

# Pure Python, no sockets: a few hundred examples per response type take about a second each.
RESPONSES = settings(max_examples=150, deadline=None, derandomize=True, database=None)
ADDRESS = "127.0.0.1:1"  # never dialled: every call is answered by the stub
# Large values sent as float16 (a wrong-dtype defect) overflow in numpy's cast: part of the defect.
FLOAT16_OVERFLOW = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


class _Stub:
    """Answers every RPC with the response it was given (as a generated stub would return it)."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def __getattr__(self, rpc: str) -> Callable[..., Any]:
        return lambda request, timeout=None: self.response


@functools.cache
def _client(kind: type) -> Any:
    ep = Endpoint(address=ADDRESS)
    if kind is GeneratorClient:
        return GeneratorClient(ep, deadline_s=1, weights_deadline_s=1)
    if kind is ValueClient:
        return ValueClient(ep, deadline_s=1, train_deadline_s=1, checkpoint_deadline_s=1)
    return kind(ep, deadline_s=1)


def answering(kind: type, response: Any) -> Any:
    """The client of class `kind` (one per class, reused), every RPC of it answered with `response`."""
    client = _client(kind)
    client._stub = client._admin = _Stub(response)
    return client


def refused(call: Callable[[], Any], *, service: str, rpc: str, field: str, why: str) -> ServiceError:
    """Run `call`; it must raise ServiceError whose message names the service, the RPC and `field`."""
    try:
        result = call()
    except ServiceError as e:
        text = str(e)
        assert text.startswith(f"{service} at {ADDRESS} service, {rpc}: "), f"{why}: {text!r}"
        assert field in e.problem, f"{why}: {text!r} does not name {field!r}"
        return e
    raise AssertionError(f"{why}: accepted, returned {result!r}")


# Arbitrary bytes: any dtype number, any shape, any data and offsets (mostly small, sometimes extreme).
wire_dtypes = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), st.integers(-(2**31), 2**31 - 1))
arbitrary_tensor = st.builds(
    lambda dtype, shape, data: pb.Tensor(dtype=dtype, shape=shape, data=data),
    wire_dtypes, st.lists(st.one_of(st.integers(0, 16), st.integers(-INT64_MAX - 1, INT64_MAX)), max_size=3),
    st.binary(max_size=96),
)
arbitrary_ragged = st.builds(
    lambda values, offsets: pb.Ragged(values=values, offsets=offsets), arbitrary_tensor,
    st.lists(st.one_of(st.integers(0, 24), st.integers(-INT64_MAX - 1, INT64_MAX)), max_size=6),
)
