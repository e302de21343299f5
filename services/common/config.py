"""Service configuration: one YAML file plus `--set key=value` overrides, validated by pydantic.

A service config file looks like

    role: reward
    model: {path: ./ckpt, dtype: auto, device: cpu}
    server: {host: 127.0.0.1, port: 50051, metrics_port: 9091, token_file: /run/secrets/token}
    options: {kind: rule, rule: arithmetic}

It is loaded by the same loader as the run config (services.common.settings): defaults < file <
environment (the QUARTET_* names in EXPOSED) < flags < `--set`. Every error names the offending
field as a dotted path, e.g. `options.max_queue: Input should be greater than 0 (got 0)`.

Each field's description is its only help text: `quartet serve --help` (and `python -m services
--help`) build their flags from these models and EXPOSED.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.common.role import ModelConfig
from services.common.settings import ConfigError, load, parse_set

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "ENV", "EXPOSED", "ConfigError", "Exposed", "ServerConfig",
           "ServiceConfig", "load_service_config", "parse_set"]

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ServerConfig(BaseModel):
    """How a role is exposed: address, limits, auth, TLS, metrics, shutdown."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind. Non-loopback addresses should use TLS and a token.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free port (see ready_file).")
    metrics_port: int | None = Field(
        0, description="Prometheus HTTP port; 0 picks a free port, null or a negative number (-1) turns metrics off."
    )
    metrics_host: str | None = Field(None, description="Address for the metrics HTTP server; default: same as host.")
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, gt=0, description="Largest gRPC message sent or received, in bytes."
    )
    workers: int = Field(
        32, gt=0,
        description="Server threads = most RPCs running at once. Every caller waiting for a batch holds one, "
        "so keep it above the role's queue limit.",
    )
    max_concurrent_rpcs: int | None = Field(
        None, gt=0, description="Optional cap on concurrent RPCs; calls beyond it get RESOURCE_EXHAUSTED."
    )
    grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT: how long in-flight calls may run before they are cancelled."
    )
    token: str | None = Field(None, repr=False, description="Call-scope bearer token; unset (with admin_token) = auth off. "
                                 "Prefer token_file or the environment to a command-line flag.")
    token_file: Path | None = Field(None, description="File holding the call token (read at start, whitespace stripped).")
    admin_token: str | None = Field(
        None, repr=False,
        description="Admin-scope token for state-changing calls (UpdateWeights, TrainStep, Save, Load). "
        "Unset: the call token also authorises them.",
    )
    admin_token_file: Path | None = Field(None, description="File holding the admin token.")
    tls_cert: Path | None = Field(None, description="PEM server certificate (chain); enables TLS together with tls_key.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."
    )

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _negative_means_off(cls, v: Any) -> Any:
        if isinstance(v, int | str) and str(v).lstrip("-").isdigit() and int(v) < 0:
            return None
        return v

    @field_validator("metrics_port")
    @classmethod
    def _port_range(cls, v: int | None) -> int | None:
        if v is not None and v > 65535:
            raise ValueError("must be at most 65535")
        return v

    @model_validator(mode="after")
    def _read_token_files(self) -> ServerConfig:
        # Reading the files here means every consumer sees plain tokens, and a missing file is an
        # error naming server.token_file rather than a silently open server.
        for value_field, file_field in (("token", "token_file"), ("admin_token", "admin_token_file")):
            path = getattr(self, file_field)
            if path is None:
                continue
            if getattr(self, value_field) is not None:
                raise ValueError(f"set only one of {value_field} and {file_field}")
            try:
                secret = Path(path).expanduser().read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ValueError(f"{file_field}: cannot read {str(path)!r}: {e.strerror}") from None
            if not secret:
                raise ValueError(f"{file_field}: {str(path)!r} is empty")
            setattr(self, value_field, secret)
        for name in ("token", "admin_token"):
            if getattr(self, name) == "":
                setattr(self, name, None)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        return self

    @property
    def auth_enabled(self) -> bool:
        return self.token is not None or self.admin_token is not None

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


class ServiceConfig(BaseModel):
    """Everything `quartet serve` needs: which role, which model, how to serve it, role options."""

    model_config = ConfigDict(extra="forbid")

    role: str | None = Field(
        None, description="generator | reward | reference | value, or the dotted module path of a custom role."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Checkpoint, dtype and device.")
    server: ServerConfig = Field(default_factory=ServerConfig, description="Address, auth, TLS, metrics, shutdown.")
    checkpoint_dir: str | None = Field(None, description="Directory where Save/Load may write/read (value role).")
    ready_file: str | None = Field(
        None, description="JSON file written (atomically) once SERVING: address, port, metrics_port, pid."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Role-specific options (validated by the role).")


@dataclass(frozen=True)
class Exposed:
    """A ServiceConfig field that may also be set by an environment variable and a `quartet serve` flag."""

    path: str    # dotted field path, e.g. "server.port"
    flag: str    # e.g. "--port"
    env: str     # e.g. "QUARTET_PORT"
    panel: str   # help panel of the flag


_AUTH = {"token", "token_file", "admin_token", "admin_token_file", "tls_cert", "tls_key", "tls_client_ca"}
_RUNTIME = {"workers", "max_concurrent_rpcs", "grace_seconds", "checkpoint_dir", "ready_file"}
#: Short names kept from the first CLI; every other field is --field-name and QUARTET_FIELD_NAME.
_SHORT = {"model.path": "model", "server.grace_seconds": "grace"}


def _exposed(path: str) -> Exposed:
    field = path.rsplit(".", 1)[-1]
    name = _SHORT.get(path, field)
    panel = ("Model" if path.startswith("model.") else "Auth and TLS" if field in _AUTH
             else "Runtime" if field in _RUNTIME else "Network")
    return Exposed(path, "--" + name.replace("_", "-"), "QUARTET_" + name.upper(), panel)


_PANELS = ("Model", "Network", "Auth and TLS", "Runtime")
#: Every model and server field, and the two top-level paths, in help-panel order; role and options
#: are set by the ROLE argument, the file or --set.
EXPOSED: tuple[Exposed, ...] = tuple(sorted(
    (_exposed(path) for path in (*(f"model.{name}" for name in ModelConfig.model_fields),
                                 *(f"server.{name}" for name in ServerConfig.model_fields),
                                 "checkpoint_dir", "ready_file")),
    key=lambda e: _PANELS.index(e.panel),
))
#: Environment variable -> dotted field path.
ENV: dict[str, str] = {e.env: e.path for e in EXPOSED}


def load_service_config(
    *,
    file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> ServiceConfig:
    """A ServiceConfig from the layers: defaults < file < environ (ENV names) < flags < --set.

    Args:
        flags: dotted field path -> value given on the command line (None: not given).
        environ: usually os.environ; None reads no environment.
    """
    return load(ServiceConfig, file=file, env=ENV, environ=environ, flags=flags, sets=sets, what="service config")
