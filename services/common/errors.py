"""Exceptions that carry a gRPC status code.

Backends raise these (they know nothing of gRPC); one server interceptor maps them to statuses,
so every role reports bad input the same way. Anything else becomes INTERNAL and is logged once.
"""

from __future__ import annotations

import grpc


class QuartetError(Exception):
    """Base class: an error with the gRPC status code it should be reported with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(QuartetError, ValueError):
    """The request is malformed; the message names the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class OutOfRange(QuartetError):
    """A value is well-formed but beyond a configured limit (e.g. token id >= vocab size)."""

    code = grpc.StatusCode.OUT_OF_RANGE

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotReady(QuartetError):
    """The service cannot answer yet (model loading, draining); the caller may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(QuartetError):
    """A queue or capacity limit is full; the caller should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(QuartetError):
    """The caller may not do this (wrong token scope, a path outside the checkpoint directory)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(QuartetError):
    """The request is valid but the service state does not allow it (e.g. a stale weight version)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class BackendError(QuartetError):
    """The backend produced something invalid (e.g. a reward plugin returned NaN); the service stays up."""

    code = grpc.StatusCode.INTERNAL
