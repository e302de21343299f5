"""Bearer-token auth with two scopes, checked in constant time on every RPC except health/reflection.

- call scope: every method of the role; accepts the call token or the admin token.
- admin scope: the role's `admin_methods` (state-changing calls); accepts only the admin token.
  A valid call token there is PERMISSION_DENIED (the caller is known, the scope is wrong);
  a missing or unknown token anywhere is UNAUTHENTICATED.

Unset tokens open their scope: no tokens at all = auth off; only an admin token = the call scope is
open and only state changes are protected; only a call token = it authorises admin methods too.
Tokens never appear in logs or error messages.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.interceptors import Around, is_exempt, method_name, wrap_handler

log = logging.getLogger(__name__)

AUTH_METADATA_KEY = "authorization"
_BEARER = "bearer "


@dataclass(frozen=True)
class Rejection:
    code: grpc.StatusCode
    message: str


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() == AUTH_METADATA_KEY:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if text[: len(_BEARER)].lower() == _BEARER:
                return text[len(_BEARER) :].strip()
            return None
    return None


def _matches(presented: str | None, expected: str | None) -> bool:
    if expected is None:
        return False
    # compare_digest on bytes of possibly different lengths leaks only the length mismatch.
    return hmac.compare_digest((presented or "").encode("utf-8"), expected.encode("utf-8"))


@dataclass(frozen=True)
class AuthPolicy:
    """Tokens and which methods (short names, e.g. "UpdateWeights") need the admin scope."""

    token: str | None
    admin_token: str | None
    admin_methods: frozenset[str]

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.admin_token is not None

    def check(self, method: str, presented: str | None) -> Rejection | None:
        """None if a call to `method` (full path) with token `presented` may proceed."""
        name = method_name(method)
        # Both comparisons always run so the time taken does not say which token matched.
        is_admin = _matches(presented, self.admin_token)
        is_call = _matches(presented, self.token)
        if name in self.admin_methods:
            required = self.admin_token if self.admin_token is not None else self.token
            if required is None or is_admin or (self.admin_token is None and is_call):
                return None
            if is_call:
                return Rejection(grpc.StatusCode.PERMISSION_DENIED, f"{name} needs the admin token")
            return Rejection(grpc.StatusCode.UNAUTHENTICATED, _missing_or_wrong(presented))
        if self.token is None or is_call or is_admin:
            return None
        return Rejection(grpc.StatusCode.UNAUTHENTICATED, _missing_or_wrong(presented))


def _missing_or_wrong(presented: str | None) -> str:
    if presented is None:
        return "missing bearer token (metadata 'authorization: Bearer <token>')"
    return "invalid bearer token"


class _Reject(Around):
    def __init__(self, rejection: Rejection) -> None:
        self.rejection = rejection

    def unary(self, invoke: Callable[[], Any], context: grpc.ServicerContext) -> Any:
        context.abort(self.rejection.code, self.rejection.message)

    def stream(self, invoke: Callable[[], Iterator[Any]], context: grpc.ServicerContext) -> Iterator[Any]:
        context.abort(self.rejection.code, self.rejection.message)
        yield  # pragma: no cover - makes this a generator; abort always raises


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls whose bearer token does not grant the method's scope."""

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_exempt(method) or not self.policy.enabled:
            return handler
        rejection = self.policy.check(method, bearer_token(handler_call_details.invocation_metadata))
        if rejection is None:
            return handler
        log.info("rejected %s: %s", method, rejection.code.name)
        return wrap_handler(handler, _Reject(rejection))
