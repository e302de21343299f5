"""Service configuration: one YAML file plus `--set key=value` overrides, validated by pydantic.

A service config file looks like

    role: reward
    model: {path: ./ckpt, dtype: auto, device: cpu}
    server: {host: 127.0.0.1, port: 50051, metrics_port: 9091, token_file: /run/secrets/token}
    options: {kind: rule, rule: arithmetic}

Layers, lowest first: defaults < file < environment (QUARTET_*) < flags < `--set`. The CLI folds
environment and flags together (click reads both) and passes only what was given, so "not given"
never overwrites a value from the file.

Every error names the offending field as a dotted path, e.g.
`options.max_queue: Input should be greater than 0`, so the fix is obvious from the message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.common.role import ModelConfig

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ConfigError(ValueError):
    """A configuration problem; the message names the field(s) and says what is wrong."""


class ServerConfig(BaseModel):
    """How a role is exposed: address, limits, auth, TLS, metrics, shutdown."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind. Non-loopback addresses should use TLS and a token.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free port (see --ready-file).")
    metrics_port: int | None = Field(
        0, description="Prometheus HTTP port; 0 picks a free port, null (or a negative number) turns metrics off."
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
    token: str | None = Field(None, repr=False, description="Call-scope bearer token; unset (with admin_token) = auth off.")
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

    role: str | None = Field(None, description="Built-in role name or a dotted module path of a custom role.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Checkpoint, dtype and device.")
    server: ServerConfig = Field(default_factory=ServerConfig, description="Address, auth, TLS, metrics, shutdown.")
    checkpoint_dir: str | None = Field(None, description="Directory where Save/Load may write/read (value role).")
    ready_file: str | None = Field(
        None, description="JSON file written (atomically) once SERVING: address, port, metrics_port, pid."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Role-specific options (validated by the role).")


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each starting with the dotted field path."""
    lines = []
    for item in err.errors():
        path = [str(p) for p in (prefix, *item["loc"]) if p != ""]
        msg = item["msg"].removeprefix("Value error, ")
        # Model-level validators name the field they reject as "field: problem"; fold it into the path.
        head, sep, rest = msg.partition(": ")
        if sep and head.isidentifier():
            path, msg = [*path, head], rest
        lines.append(f"{'.'.join(path) or 'config'}: {msg}")
    return "\n".join(lines)


def validate_model(model: type[BaseModel], data: Any, *, prefix: str) -> BaseModel:
    """model.model_validate(data) with errors rewritten as ConfigError naming `prefix.field`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix)) from None


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """`["server.port=5000", "options.kind=rule"]` -> nested dict; values parsed as YAML scalars.

    YAML parsing makes `5000` an int, `true` a bool, `[1, 2]` a list and `null` None, while a plain
    word stays a string.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected key=value with a dotted key, e.g. server.port=5000")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_path(out, key.split("."), value)
    return out


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Dicts merge key by key; anything else in `override` replaces the value in `base`."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping (role, model, server, options)")
    return data


def load_service_config(
    *,
    file: str | Path | None = None,
    given: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
) -> ServiceConfig:
    """Build a ServiceConfig from the layers: defaults < file < given (env and flags) < --set.

    Args:
        given: nested dict of values the user actually gave as flags or env vars (None = not given).
    """
    data: dict[str, Any] = read_config_file(file) if file is not None else {}
    data = deep_merge(data, _drop_none(given or {}))
    data = deep_merge(data, parse_set(sets))
    return validate_model(ServiceConfig, data, prefix="")  # type: ignore[return-value]


def _drop_none(tree: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub = _drop_none(value)
            if sub:
                out[key] = sub
        elif value is not None:
            out[key] = value
    return out
