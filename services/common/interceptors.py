"""Server interceptors: the shared plumbing, and the one that maps exceptions to status codes.

grpc's sync ServerInterceptor can only swap the method handler, so each interceptor here wraps
the handler's behaviour function in an `Around` and rebuilds a handler of the same kind (unary or
streaming request, unary or streaming response). The health and reflection services pass through
untouched: they need no auth, their metrics would be noise, and health's Watch relies on a
non-blocking attribute of its behaviour function that wrapping would hide.

Order (outermost first): metrics, auth, errors. Metrics therefore count rejected calls too, and
see every failure as a status code already set on the context.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from services.common.errors import QuartetError

log = logging.getLogger(__name__)

#: Method-path prefixes of the infrastructure services no interceptor touches.
EXEMPT_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def is_exempt(method: str) -> bool:
    return method.startswith(EXEMPT_PREFIXES)


def method_name(method: str) -> str:
    """"/quartet.v1.Generator/Generate" -> "Generate"."""
    return method.rsplit("/", 1)[-1]


class Around:
    """What to do around one call. `invoke()` runs the wrapped behaviour.

    `unary` wraps calls with a single response; `stream` wraps calls with a response stream and
    must itself be a generator (exceptions in streamed responses arise while iterating).
    """

    def unary(self, invoke: Callable[[], Any], context: grpc.ServicerContext) -> Any:
        return invoke()

    def stream(self, invoke: Callable[[], Iterator[Any]], context: grpc.ServicerContext) -> Iterator[Any]:
        yield from invoke()


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` whose behaviour runs inside `around`."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        b_uu = handler.unary_unary
        return grpc.unary_unary_rpc_method_handler(lambda r, c: around.unary(lambda: b_uu(r, c), c), **kw)
    if handler.stream_unary is not None:
        b_su = handler.stream_unary
        return grpc.stream_unary_rpc_method_handler(lambda it, c: around.unary(lambda: b_su(it, c), c), **kw)
    if handler.unary_stream is not None:
        b_us = handler.unary_stream
        return grpc.unary_stream_rpc_method_handler(lambda r, c: around.stream(lambda: b_us(r, c), c), **kw)
    b_ss = handler.stream_stream
    return grpc.stream_stream_rpc_method_handler(lambda it, c: around.stream(lambda: b_ss(it, c), c), **kw)


def aborted(context: grpc.ServicerContext) -> bool:
    """True if the call already has a non-OK status (context.abort raises a bare Exception after setting it)."""
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


class _MapErrors(Around):
    def __init__(self, method: str) -> None:
        self.method = method

    def _handle(self, e: Exception, context: grpc.ServicerContext) -> None:
        if isinstance(e, QuartetError):
            context.abort(e.code, e.message)
        if aborted(context):
            raise e  # an abort from the servicer (or an inner interceptor): keep its status
        # Logged here and only here, with the traceback; the client learns the type, not the text,
        # since exception messages can carry paths or data that are not the caller's business.
        log.exception("unhandled exception in %s", self.method)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {self.method}: {type(e).__name__}")

    def unary(self, invoke: Callable[[], Any], context: grpc.ServicerContext) -> Any:
        try:
            return invoke()
        except Exception as e:
            self._handle(e, context)

    def stream(self, invoke: Callable[[], Iterator[Any]], context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from invoke()
        except Exception as e:
            self._handle(e, context)


class ErrorInterceptor(grpc.ServerInterceptor):
    """QuartetError -> its status code and message; anything else -> INTERNAL, logged once."""

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or is_exempt(handler_call_details.method):
            return handler
        return wrap_handler(handler, _MapErrors(handler_call_details.method))
