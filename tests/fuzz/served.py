"""The role under fuzzing: served on 127.0.0.1 (metrics off) with one channel per token scope."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.common.channel import open_channel
from services.common.config import ServerConfig
from services.common.role import ModelConfig
from services.common.server import start_server

CALL, ADMIN = "fuzz-call", "fuzz-admin"


class Served:
    """A started role server and two channels to it: `call` carries the call token, `admin` the admin token.

    Also a context manager: leaving it closes the channels and stops the server at once (grace 0).
    """

    def __init__(self, role: str, options: dict[str, Any], *, model: Path | None = None, **kw: Any) -> None:
        self.server = start_server(
            role, model=None if model is None else ModelConfig(path=str(model), dtype="float32", device="cpu"),
            options=options, server=ServerConfig(token=CALL, admin_token=ADMIN, metrics_port=None), **kw)
        self.call = open_channel(self.server.address, token=CALL)
        self.admin = open_channel(self.server.address, token=ADMIN)

    def close(self) -> None:
        """Close both channels and stop the server; a second close does nothing more."""
        self.call.close()
        self.admin.close()
        self.server.stop(grace=0)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
