"""Graceful shutdown of a real `quartet serve` process: SIGTERM drains in-flight calls, then exit 0.

The process serves the echo test role (tests/integration/echo_role.py) by module path, the way a
custom role is served. Start-up is mostly importing torch: timeouts are generous because CI
machines are shared, while the drain itself is asserted to stay within the grace period.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from quartet.v1 import generator_pb2_grpc
from services.common.channel import health_status, open_channel
from tests.integration.echo_role import ROLE, generate_request

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90.0


def quartet_command() -> list[str]:
    """The installed `quartet` console script next to this interpreter, else `python -m cli.main`."""
    script = Path(sys.executable).parent / "quartet"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def spawn_serve(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in [k for k in env if k.startswith("QUARTET_")]:
        del env[key]
    with log.open("wb") as out:
        return subprocess.Popen([*quartet_command(), "serve", ROLE, *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for_file(path: Path, proc: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"quartet serve exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"quartet serve not ready after {START_TIMEOUT} s:\n{log.read_text()}")
        time.sleep(0.05)
    return json.loads(path.read_text())


def in_flight(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "quartet_rpc_in_flight" and s.labels.get("method") == "Generate")


def test_sigterm_lets_in_flight_calls_finish_within_grace_then_exits_0(tmp_path: Path) -> None:
    ready_file, log, grace = tmp_path / "ready.json", tmp_path / "serve.log", 3.0
    proc = spawn_serve("--ready-file", str(ready_file), "--grace", str(grace), log=log)
    try:
        ready = wait_for_file(ready_file, proc, log)
        assert ready["pid"] == proc.pid and ready["port"] > 0 and ready["metrics_port"] > 0
        assert ready["address"] == f"127.0.0.1:{ready['port']}"
        channel = open_channel(ready["address"])
        stub = generator_pb2_grpc.GeneratorStub(channel)
        short = stub.Generate.future(generate_request(), metadata=[("x-sleep", "1.0")], timeout=30)
        stuck = stub.Generate.future(generate_request(), metadata=[("x-sleep", "60")], timeout=60)
        deadline = time.monotonic() + 10
        while in_flight(ready["metrics_port"]) < 2:
            assert time.monotonic() < deadline, "calls never started"
            time.sleep(0.02)

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # The short call completes normally; the stuck one is cancelled when the grace period ends.
        assert list(short.result().completion_ids.offsets) == [0, 3]
        with pytest.raises(grpc.RpcError) as err:
            stuck.result()
        assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert proc.wait(timeout=grace + 10) == 0, log.read_text()
        elapsed = time.monotonic() - t0
        assert grace - 0.5 <= elapsed <= grace + 3.0, f"drain took {elapsed:.2f} s"
        assert not ready_file.exists()  # removed when draining starts, so launchers never read a stale one
        assert health_status(channel, timeout=1).startswith("UNREACHABLE")
        text = log.read_text()
        assert "SIGTERM received: draining" in text and "stopped echo" in text
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_while_loading_exits_0(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    proc = spawn_serve("--port", str(port), "--metrics-port", "-1", "--set", "options.block_load=true", log=log)
    try:
        channel = open_channel(f"127.0.0.1:{port}")
        deadline = time.monotonic() + START_TIMEOUT
        while (status := health_status(channel, timeout=1)) != "NOT_SERVING":
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"never reached NOT_SERVING (last: {status})"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
