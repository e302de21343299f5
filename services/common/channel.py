"""Client side: a channel that carries the bearer token, optionally over TLS / mTLS, plus health helpers.

The token is added by a client interceptor rather than call credentials: grpc only sends call
credentials over TLS, and the embedded stack talks plaintext on loopback.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import AUTH_METADATA_KEY
from services.common.config import DEFAULT_MAX_MESSAGE_BYTES

PemSource = bytes | str | Path


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Appends `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._entry = (AUTH_METADATA_KEY, f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._entry]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):  # type: ignore[no-untyped-def]
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def _pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).expanduser().read_bytes()


def open_channel(
    address: str,
    *,
    token: str | None = None,
    root_cert: PemSource | None = None,
    client_cert: PemSource | None = None,
    client_key: PemSource | None = None,
    server_name: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to `address` ("host:port") whose calls carry the bearer token if one is given.

    Args:
        root_cert: PEM bytes or a path: the CA that signed the server certificate; turns TLS on.
        client_cert, client_key: PEM bytes or paths: the client certificate for mTLS.
        server_name: override the name checked against the server certificate (e.g. "localhost"
            when connecting by IP to a certificate issued for a host name).
    """
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *options,
    ]
    if root_cert is not None or client_cert is not None:
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key must be given together")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_pem(root_cert), private_key=_pem(client_key), certificate_chain=_pem(client_cert)
        )
        if server_name is not None:
            opts.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(address, creds, options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    if token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel


def health_status(channel: grpc.Channel, service: str = "", *, timeout: float = 2.0) -> str:
    """The health status name ("SERVING", "NOT_SERVING", ...) of `service` ("" = the whole server).

    Transport failures and unknown services are returned as "UNREACHABLE: <code>" / "SERVICE_UNKNOWN"
    rather than raised, so callers can print them.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        return f"UNREACHABLE: {e.code().name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_serving(channel: grpc.Channel, service: str = "", *, timeout: float = 60.0, poll: float = 0.05) -> bool:
    """Poll health until `service` is SERVING or `timeout` seconds pass; True if it became SERVING."""
    deadline = time.monotonic() + timeout
    while True:
        if health_status(channel, service, timeout=max(0.1, min(2.0, deadline - time.monotonic()))) == "SERVING":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
