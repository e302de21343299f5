"""What the embedded stack starts and what it hands back: the role specs, the restart policy, the
TLS files of the local services and the address of each running child (`services.launcher`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LaunchError(RuntimeError):
    """A local service did not come up; the message carries the tail of its log."""


@dataclass(frozen=True)
class ServiceSpec:
    """One role to start."""

    role: str
    model_path: str | None
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    name: str | None = None  # log / file name; default: the role

    @property
    def label(self) -> str:
        return self.name or self.role


@dataclass(frozen=True)
class RestartPolicy:
    """How crashed children are restarted: restart k (1-based) waits min(max_delay_s, base_delay_s * 2^(k-1))."""

    max_restarts: int = 5  # per service over the stack's life; 0 = never restart
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def delay(self, restart: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * 2 ** (restart - 1))


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS between the orchestrator and its local services (all paths).

    cert/key: every child's server certificate (must name 127.0.0.1); ca: verifies it. client_cert/
    client_key turn on mTLS: children then require a client certificate signed by client_ca (default: ca).
    """

    cert: str
    key: str
    ca: str
    client_cert: str | None = None
    client_key: str | None = None
    client_ca: str | None = None

    @property
    def mutual(self) -> bool:
        return self.client_cert is not None

    def server_section(self) -> dict[str, str]:
        """The `server:` keys of a child's config."""
        section = {"tls_cert": self.cert, "tls_key": self.key}
        if self.mutual:
            section["tls_client_ca"] = self.client_ca or self.ca
        return section


@dataclass(frozen=True)
class LaunchedService:
    """A running child: where it listens and how to reach it."""

    label: str
    role: str
    address: str
    port: int
    metrics_port: int | None
    pid: int
    log_path: Path
    token: str
    admin_token: str
