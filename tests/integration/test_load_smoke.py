"""A small run of the load driver (benchmarks/load_test.py) against a real reference server on
127.0.0.1: past capacity the excess gets RESOURCE_EXHAUSTED quickly and accepted calls complete.
The full load test, with its latency and memory figures, is the script, not a timed test."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.load_test import Role, drive, make_call
from services.common.channel import open_channel
from services.common.config import ServerConfig
from services.common.role import ModelConfig
from services.common.server import start_server

CALLS, CLIENTS = 100, 12


@pytest.mark.timeout(120)
def test_overload_is_refused_quickly_and_accepted_calls_complete(tiny_checkpoint: Path) -> None:
    role = Role("reference", {"max_concurrent": 1}, {}, "LogProbs")
    srv = start_server("reference", model=ModelConfig(path=str(tiny_checkpoint), dtype="float32", device="cpu"),
                       options=role.options, server=ServerConfig(token="load-test-token", metrics_port=None))
    channel = open_channel(srv.address, token="load-test-token")
    try:
        call = make_call(role, channel, timeout_s=10.0)
        call()  # warm-up
        result = drive(call, calls=CALLS, clients=CLIENTS, time_limit_s=60.0)
    finally:
        channel.close()
        srv.stop(grace=0)

    assert result.calls == CALLS
    assert result.other_errors == {}, result.codes
    assert result.rejected > 0 and result.accepted > 0, result.codes
    assert result.rejected_max_s < 1.0, f"slowest refusal took {result.rejected_max_s:.3f} s"
    assert result.accepted_max_s < 5.0, f"slowest accepted call took {result.accepted_max_s:.3f} s"
