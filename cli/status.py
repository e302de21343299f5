"""`quartet status` (health + GetInfo of endpoints, as a table) and `quartet health` (for HEALTHCHECK)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

_TLS = "TLS"


def _tls_ca(of: str) -> Any:
    return typer.Option("--tls-ca", envvar="QUARTET_TLS_CA", rich_help_panel=_TLS, show_default=False,
                        help=f"PEM CA of {of}; turns TLS on.")


# The client's TLS options, the same for every command that dials a service.
_TlsCert = Annotated[Path | None, typer.Option("--tls-cert", rich_help_panel=_TLS, show_default=False,
                                               help="Client certificate for mTLS.")]
_TlsKey = Annotated[Path | None, typer.Option("--tls-key", rich_help_panel=_TLS, show_default=False,
                                              help="Key of --tls-cert.")]
_ServerName = Annotated[str | None, typer.Option("--server-name", rich_help_panel=_TLS, show_default=False,
                                                 help="Name to check the server certificate against.")]


@dataclass(frozen=True)
class EndpointStatus:
    """What one endpoint reported; `error` says why a field is missing."""

    address: str
    health: str                  # SERVING, NOT_SERVING, UNREACHABLE: <code>, ...
    role: str = ""
    backend: str = ""
    model: str = ""
    version: str = ""
    weight_version: int = 0
    tokenizer_fingerprint: str = ""
    identity: str = ""
    error: str = ""

    @property
    def up(self) -> bool:
        return self.health == "SERVING"


def _channel(address: str, token: str | None, tls_ca: Path | None, tls_cert: Path | None,
             tls_key: Path | None, server_name: str | None) -> Any:
    from services.common.channel import open_channel

    return open_channel(address, token=token, root_cert=tls_ca, client_cert=tls_cert, client_key=tls_key,
                        server_name=server_name)


def probe(channel: Any, address: str, *, timeout: float) -> EndpointStatus:
    """Health of the server, then which role it serves (by health service name), then its GetInfo."""
    import grpc

    from quartet.v1 import common_pb2, generator_pb2_grpc, reference_pb2_grpc, reward_pb2_grpc, value_pb2_grpc
    from services.common.channel import health_status
    from services.common.roles import ROLE_SERVICES

    stubs = {"generator": generator_pb2_grpc.GeneratorStub, "reward": reward_pb2_grpc.RewardStub,
             "reference": reference_pb2_grpc.ReferenceStub, "value": value_pb2_grpc.ValueStub}
    overall = health_status(channel, "", timeout=timeout)
    if overall.startswith("UNREACHABLE"):
        return EndpointStatus(address=address, health=overall)
    role = ""
    for name, service in ROLE_SERVICES.items():
        found = health_status(channel, service, timeout=timeout)
        if found != "SERVICE_UNKNOWN" and not found.startswith("UNREACHABLE"):
            role = name
            break
    if not role:
        return EndpointStatus(address=address, health=overall, error="no Quartet role service found")
    try:
        info = stubs[role](channel).GetInfo(common_pb2.GetInfoRequest(), timeout=timeout)
    except grpc.RpcError as e:
        return EndpointStatus(address=address, health=overall, role=role,
                              error=f"GetInfo: {e.code().name}: {e.details()}")
    return EndpointStatus(
        address=address, health=overall, role=info.role or role, backend=info.backend, model=info.model_path,
        version=info.version, weight_version=info.weight_version,
        tokenizer_fingerprint=info.tokenizer_fingerprint, identity=info.identity,
    )


def _table(rows: list[EndpointStatus]) -> Any:
    from rich.table import Table

    table = Table(title="Quartet services")
    for col in ("address", "role", "health", "backend", "model", "weights", "version", "tokenizer", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        color = "green" if r.up else "red"
        table.add_row(r.address, r.role, f"[{color}]{r.health}[/]", r.backend, r.model,
                      str(r.weight_version) if r.role else "", r.version, r.tokenizer_fingerprint[:12], r.error)
    return table


def status(
    addresses: Annotated[list[str], typer.Argument(help="host:port of each service.", show_default=False)],
    token: Annotated[str | None, typer.Option("--token", envvar="QUARTET_TOKEN", show_default=False,
                                              help="Call token (GetInfo needs it when auth is on).")] = None,
    tls_ca: Annotated[Path | None, _tls_ca("the servers")] = None,
    tls_cert: _TlsCert = None,
    tls_key: _TlsKey = None,
    server_name: _ServerName = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Deadline of each call, seconds.")] = 3.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Health and GetInfo of each endpoint, as a table (or --json). Exit code 1 if any is not SERVING."""
    rows = []
    for address in addresses:
        channel = _channel(address, token, tls_ca, tls_cert, tls_key, server_name)
        try:
            rows.append(probe(channel, address, timeout=timeout))
        finally:
            channel.close()
    if as_json:
        typer.echo(json.dumps([{**asdict(r), "up": r.up} for r in rows], indent=2))
    else:
        from cli import console as make_console

        make_console().print(_table(rows))
    raise typer.Exit(0 if all(r.up for r in rows) else 1)


def health(
    address: Annotated[str, typer.Argument(help="host:port of the service.", show_default=False)],
    service: Annotated[str, typer.Option("--service", help="Health service name; empty = the whole server.")] = "",
    tls_ca: Annotated[Path | None, _tls_ca("the server")] = None,
    tls_cert: _TlsCert = None,
    tls_key: _TlsKey = None,
    server_name: _ServerName = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Deadline, seconds.")] = 2.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print the status.")] = False,
) -> None:
    """Exit 0 iff the service reports SERVING (quiet; for Docker HEALTHCHECK). Needs no token."""
    from services.common.channel import health_status

    channel = _channel(address, None, tls_ca, tls_cert, tls_key, server_name)
    try:
        result = health_status(channel, service, timeout=timeout)
    finally:
        channel.close()
    if verbose:
        typer.echo(result)
    raise typer.Exit(0 if result == "SERVING" else 1)
