"""The contract between the one server runtime and each model role.

A role package (services/generator, services/reward, ...) exposes in its `__init__.py`:

    NAME: str                       # "generator"
    Options: type[pydantic.BaseModel]  # the role's own typed options (backend, limits, ...)
    def create(ctx: RoleContext, options: Options) -> Role

`services.common.server.serve_role` builds the gRPC server (auth, status mapping, metrics,
health, reflection, TLS), calls `create`, registers the servicer, marks health NOT_SERVING,
calls `role.load()` (the slow part: loading the model), then marks health SERVING. On SIGTERM it
marks NOT_SERVING, stops accepting, lets in-flight calls finish, then calls `role.close()`.

The servicer is thin (decode, call the backend, encode); the backend is a plain class that tests
drive directly without gRPC.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field


def quartet_version() -> str:
    """The installed quartet-rl version, reported in every GetInfo."""
    from importlib import metadata

    try:
        return metadata.version("quartet-rl")
    except metadata.PackageNotFoundError:  # a source tree that was not installed
        return "0+unknown"


def model_identity(role: str, model_path: str | None, backend: str | None = None) -> str:
    """Stable service identity for GetInfo and `quartet_service_info`: "role/[backend:]checkpoint-dir@host"."""
    import socket

    folder = str(model_path or "").rstrip("/").rsplit("/", 1)[-1]
    return f"{role}/{backend + ':' if backend else ''}{folder}@{socket.gethostname()}"


class ModelConfig(BaseModel):
    """Which checkpoint a role serves and where it computes."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    path: str | None = Field(None, description="Local Hugging Face checkpoint directory (config.json, weights, tokenizer).")
    dtype: str = Field("auto", description="Compute dtype: auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16 on CUDA).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto: CUDA when present).")


def model_limits(calls: str, *, trains: bool = False) -> type[BaseModel]:
    """The base of the Options of a role that runs one model over whole prompt ++ response rows,
    micro-batched under a token budget (reference, value): its batching and admission limits.

    Args:
        calls: the RPCs the limits count, as the help texts name them ("LogProbs", "Values or TrainStep").
        trains: the role also changes its weights (TrainStep): passes run backward too, scoring and
            training calls are admitted apart, and admitted calls take turns on the weights.
    """
    passes = "forward (and backward) pass" if trains else "forward pass"
    apart = ", each method counted apart" if trains else ""
    turns = " Admitted calls still take turns on the weights." if trains else ""

    class ModelLimits(BaseModel):
        model_config = ConfigDict(extra="forbid")

        max_batch_tokens: int = Field(
            4096, ge=1,
            description=f"Token budget of one {passes}, padding included (rows x longest row); lower it if "
                        f"{calls} runs out of memory. Also the longest sequence accepted.")
        max_batch_sequences: int = Field(
            1024, ge=1, description=f"Most sequences in one {calls} call; more is INVALID_ARGUMENT.")
        max_tokens_per_call: int = Field(
            262144, ge=1,
            description=f"Most tokens (prompt + response, all rows) in one {calls} call; more is INVALID_ARGUMENT.")
        max_concurrent: int = Field(
            4, ge=1,
            description=f"{calls} calls admitted at once{apart}; one more gets "
                        f"RESOURCE_EXHAUSTED (retry with backoff).{turns}")
        attn_implementation: str | None = Field(
            None, description="transformers attention kernel (e.g. 'eager', 'sdpa'); unset = the model's default.")

    return ModelLimits


@dataclass
class RoleContext:
    """What the runtime hands a role when creating it."""

    model: ModelConfig
    registry: CollectorRegistry          # role-specific Prometheus metrics go here
    max_message_bytes: int               # the server's receive limit, reported in GetInfo limits
    checkpoint_dir: Path | None = None   # where Save/Load may write/read (value role)
    extra: dict[str, str] = field(default_factory=dict)


class Role(Protocol):
    """A loaded (or loading) model role behind one gRPC service."""

    #: Full proto service name, e.g. "quartet.v1.Generator" (for health and reflection).
    service_name: str
    #: Method names that need the admin token scope, e.g. {"UpdateWeights"}.
    admin_methods: frozenset[str]
    #: Optional, read by the runtime for `quartet_service_info`: the backend name (e.g.
    #: "transformers", "rule:arithmetic") and a stable identity (default "<role>@<hostname>").
    backend: str
    identity: str

    def add_to_server(self, server: grpc.Server) -> None:
        """Register the servicer (generated add_XServicer_to_server)."""

    def load(self) -> None:
        """Load the model; may take long. Calls arriving before it returns get UNAVAILABLE."""

    def close(self) -> None:
        """Release background threads and resources after the server stopped."""


RoleFactory = Callable[[RoleContext, BaseModel], Role]
