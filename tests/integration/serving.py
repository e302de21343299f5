"""Helpers of the integration tests that serve a role in this process on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.common.config import ServerConfig
from services.common.role import ModelConfig
from services.common.server import RunningServer, start_server


@contextmanager
def serve_generator(path: Path, *, token: str, admin_token: str, **options: object) -> Iterator[RunningServer]:
    """A generator serving the checkpoint at `path` (fp32, CPU) with these tokens and role `options`;
    stopped at once (grace 0) when the block ends."""
    srv = start_server("generator", model=ModelConfig(path=str(path), dtype="float32", device="cpu"),
                       options=options, server=ServerConfig(token=token, admin_token=admin_token))
    try:
        yield srv
    finally:
        srv.stop(grace=0)


def metric(srv: RunningServer, name: str, labels: dict[str, str] | None = None) -> float:
    """The server's current value of metric sample `name` with `labels`; 0 when it has not been recorded."""
    return srv.registry.get_sample_value(name, labels or {}) or 0.0


def hold_load(monkeypatch: pytest.MonkeyPatch, backend: type) -> threading.Event:
    """Make `backend.load` wait until the returned event is set (30 s at most): a server started with
    wait_ready=False is then up but not loaded. Set the event before stopping the server."""
    release = threading.Event()
    original = backend.load

    def held(self: object) -> None:
        release.wait(30)
        original(self)

    monkeypatch.setattr(backend, "load", held)
    return release


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `cond` every 10 ms until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
