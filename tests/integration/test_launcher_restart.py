"""The embedded launcher restarts crashed children with backoff, on the same address, and only while running.

Real child processes (`quartet serve`) on loopback: a SIGKILLed generator comes back SERVING on the
same address and tokens, so a client built before the kill reaches it again; max_restarts is
honoured; stop() restarts nothing and leaves no process of the children's groups behind.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from orchestrator.remote.clients import GeneratorClient, RewardClient
from orchestrator.remote.retry import RetryPolicy, ServiceError
from orchestrator.run.config import Endpoint
from services.common.channel import health_status, open_channel
from services.launcher import LaunchedService, LocalStack, RestartPolicy, ServiceSpec
from tests.e2e.test_run import e2e_config, task  # noqa: F401 (task is a fixture used by name)

RULE = {"kind": "rule", "rule": "arithmetic", "workers": 1}
FAST = RestartPolicy(max_restarts=2, base_delay_s=0.2, max_delay_s=1.0)
PATIENT = RetryPolicy(max_attempts=100, initial_backoff_s=0.1, max_backoff_s=0.5, budget_s=60.0)


def _group_members(pgids: set[int]) -> list[int]:
    """Live processes whose process group is one of `pgids` (each child leads its own group)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) in pgids:
            found.append(int(entry.name))
    return found


def _wait_for(predicate, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def _endpoint(s: LaunchedService) -> Endpoint:
    return Endpoint(address=s.address, token=s.token, admin_token=s.admin_token)


def test_killed_generator_comes_back_on_the_same_address(tiny_checkpoint: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    specs = [ServiceSpec("generator", str(tiny_checkpoint)), ServiceSpec("reward", None, RULE)]
    restarted: list[tuple[str, int]] = []
    with LocalStack(tmp_path, specs, restart=FAST, grace_s=2.0,
                    on_restart=lambda label, code: restarted.append((label, code))) as stack:
        before = stack.services["generator"]
        # Built before the kill: the orchestrator's channels must reconnect without a new address.
        client = GeneratorClient(_endpoint(before), deadline_s=5, weights_deadline_s=5, retry=PATIENT)
        assert client.info().weight_version == 0
        with caplog.at_level(logging.WARNING, logger="quartet.launcher"):
            os.kill(before.pid, signal.SIGKILL)
            waited = _wait_for(lambda: stack.services["generator"].pid != before.pid, 30, "the generator's restart")
            info = client.info()  # through the channel opened before the kill
        after = stack.services["generator"]
        print(f"generator back SERVING {waited:.1f} s after SIGKILL")
        assert (after.address, after.port, after.token, after.admin_token) == (
            before.address, before.port, before.token, before.admin_token)
        assert info.weight_version == 0 and info.role == "generator"
        assert stack.restarts == {"generator": 1, "reward": 0}
        assert restarted == [("generator", -signal.SIGKILL)]
        assert stack.gave_up == []
        lines = [r.getMessage() for r in caplog.records]
        assert any("generator" in m and "restart 1 of 2" in m and "code -9" in m for m in lines), lines
        # The same log file, appended: the first run's lines are still there, then the marker, then the new run.
        text = before.log_path.read_text()
        marker = text.index("--- quartet launcher: restart 1 after exit code -9")
        assert "listening on" in text[:marker] and "listening on" in text[marker:]
        for secret in (before.token, before.admin_token):
            assert secret not in text and all(secret not in m for m in lines)
        client.close()


def _server_side_states(port: int) -> list[str]:
    """TCP states (kernel hex codes; 06 = TIME_WAIT) of sockets whose local port is `port`."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC listens on a dual-stack socket
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                states.append(fields[3])
    return states


def _leave_time_wait(port: int, pid: int) -> None:
    """SIGKILL the server `pid` while a raw client is connected, so the server's side ends in TIME_WAIT."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    time.sleep(0.2)  # the server has accepted and sent its HTTP/2 settings
    os.kill(pid, signal.SIGKILL)
    while raw.recv(4096):  # read to the kernel's FIN: closing with unread data would send RST, not FIN
        pass
    raw.close()  # our FIN: the dead server's half moves to TIME_WAIT


def test_max_restarts_is_honoured_and_a_port_in_time_wait_is_rebound(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    policy = RestartPolicy(max_restarts=1, base_delay_s=1.0, max_delay_s=1.0)
    with LocalStack(tmp_path, [ServiceSpec("reward", None, RULE)], restart=policy, grace_s=2.0) as stack:
        first = stack.services["reward"]
        _leave_time_wait(first.port, first.pid)
        # The restart (1 s later) binds over it: gRPC sets SO_REUSEADDR on its listeners (old and new).
        assert "06" in _server_side_states(first.port)
        _wait_for(lambda: stack.services["reward"].pid != first.pid, 30, "the reward service's restart")
        second = stack.services["reward"]
        assert second.port == first.port
        assert health_status(open_channel(second.address), timeout=5) == "SERVING"
        with caplog.at_level(logging.ERROR, logger="quartet.launcher"):
            os.kill(second.pid, signal.SIGKILL)
            _wait_for(lambda: stack.gave_up == ["reward"], 10, "the launcher to give up")
        time.sleep(1.5)  # longer than the backoff: nothing starts again
        assert stack.restarts == {"reward": 1}
        assert stack.procs["reward"].poll() == -signal.SIGKILL
        assert any("used all 1 restarts" in r.getMessage() for r in caplog.records)
        # A client sees a dead service: its retry budget ends in an error naming the service and the call.
        client = RewardClient(_endpoint(second), deadline_s=1,
                              retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1, budget_s=2))
        with pytest.raises(ServiceError, match=r"reward at 127\.0\.0\.1:\d+ service, GetInfo: .*UNAVAILABLE"):
            client.info()
        client.close()


def test_stop_restarts_nothing_and_leaves_no_orphans(tmp_path: Path) -> None:
    # A long backoff: the kill below is still waiting for its restart when stop() comes.
    slow = RestartPolicy(max_restarts=3, base_delay_s=5.0, max_delay_s=5.0)
    specs = [ServiceSpec("reward", None, RULE), ServiceSpec("reward", None, RULE, name="reward2")]
    stack = LocalStack(tmp_path, specs, restart=slow, grace_s=2.0)
    stack.start()
    pids = set(stack.pids)
    os.kill(stack.services["reward2"].pid, signal.SIGKILL)
    time.sleep(0.5)  # the monitor has seen it and is in its backoff
    stopped = time.monotonic()
    stack.stop()
    assert time.monotonic() - stopped < 4.0, "stop() waited for a restart's backoff"
    time.sleep(0.5)
    assert stack.restarts == {"reward": 0, "reward2": 0}
    assert all(p.poll() is not None for p in stack.procs.values())
    assert _group_members(pids) == []
    stack.stop()  # a second stop (atexit) is harmless


def test_a_session_counts_restarts_in_its_metrics_and_runs_on(tiny_checkpoint: Path, task: dict[str, Path],  # noqa: F811
                                                              tmp_path: Path) -> None:
    from orchestrator.run.session import Session

    cfg = e2e_config("grpo", tiny_checkpoint, task, tmp_path / "run", "steps=1", "metrics_port=null",
                     "services.local_options.restart_backoff_s=0.1", "services.retry.max_attempts=100",
                     "services.retry.initial_backoff_s=0.1", "services.retry.max_backoff_s=0.5")
    with Session(cfg) as session:
        stack, registry = session.stack, session.metrics.registry
        first = stack.services["reward"]
        os.kill(first.pid, signal.SIGKILL)
        _wait_for(lambda: stack.services["reward"].pid != first.pid, 30, "the reward service's restart")
        assert registry.get_sample_value("quartet_service_restarts_total", {"service": "reward"}) == 1
        assert registry.get_sample_value("quartet_service_restarts_total", {"service": "generator"}) is None
        results = session.orchestrator.run()  # its first Score reaches the restarted reward service
    assert [r.step for r in results] == [1]
