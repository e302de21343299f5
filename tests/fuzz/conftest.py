"""The fuzz tests' server fixture: a role served from the tiny checkpoint, stopped with the module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fuzz.served import Served


@pytest.fixture(scope="module")
def serve(tiny_checkpoint: Path) -> Iterator[Callable[..., Served]]:
    """`serve(role, options, **start_server_kw)`: the role served from the tiny checkpoint (fp32, CPU);
    `model=None` for a role without one (reward). Whatever is still running when the module ends is
    stopped then; use the result as a context manager to stop it sooner."""
    started: list[Served] = []

    def start(role: str, options: dict[str, Any], **kw: Any) -> Served:
        started.append(Served(role, options, **{"model": tiny_checkpoint, **kw}))
        return started[-1]

    yield start
    for served in started:
        served.close()
