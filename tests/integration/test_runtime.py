"""The server runtime over real gRPC on 127.0.0.1: health transitions, reflection, metrics, status mapping.

Uses the echo test role (tests/integration/echo_role.py), a fake Generator, so the runtime is
tested independently of the real roles.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from quartet.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.common.channel import health_status, open_channel
from services.common.codec import decode_ragged
from services.common.config import ConfigError, ServerConfig
from services.common.server import BindError, RunningServer, start_server
from tests.integration.echo_role import ROLE, generate_request, weight_chunks

SERVICE = "quartet.v1.Generator"


@pytest.fixture
def server(tokens: dict[str, str]) -> Iterator[RunningServer]:
    srv = start_server(ROLE, server=ServerConfig(token=tokens["token"], admin_token=tokens["admin_token"]))
    yield srv
    srv.stop(grace=0)


def _check(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def test_health_not_serving_until_loaded_then_serving_then_not_serving_on_drain() -> None:
    srv = start_server(ROLE, options={"block_load": True}, wait_ready=False)
    channel = open_channel(srv.address)
    stub = generator_pb2_grpc.GeneratorStub(channel)
    try:
        assert _check(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _check(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:  # the role raises NotReady while loading
            stub.Generate(generate_request(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert srv.registry.get_sample_value("quartet_service_ready", {"role": "echo"}) == 0

        srv.role.release.set()
        assert srv.wait_ready(timeout=10)
        assert _check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert _check(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        assert srv.registry.get_sample_value("quartet_service_ready", {"role": "echo"}) == 1
        # The process's peak resident memory, read at scrape time (this test process holds torch: > 50 MB).
        assert srv.registry.get_sample_value("quartet_peak_rss_bytes", {"role": "echo"}) > 50e6

        # Drain with a call in flight: a Watch opened before sees NOT_SERVING, the call still completes.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=20)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        slow = stub.Generate.future(generate_request(), metadata=[("x-sleep", "1.0")], timeout=10)
        time.sleep(0.3)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 10})
        t0 = time.monotonic()
        stopper.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert decode_ragged(slow.result().completion_ids).rows()[0].tolist() == [3, 2, 1]
        stopper.join(timeout=10)
        assert not stopper.is_alive() and time.monotonic() - t0 < 5
        assert srv.role.closed
        assert srv.registry.get_sample_value("quartet_service_ready", {"role": "echo"}) == 0
        assert health_status(channel, timeout=1).startswith("UNREACHABLE")
    finally:
        srv.role.release.set()
        srv.stop(grace=0)
        channel.close()


def test_reflection_lists_services(server: RunningServer) -> None:
    channel = open_channel(server.address)  # reflection, like health, needs no token
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert described.file_descriptor_response.file_descriptor_proto  # the .proto is served too
    channel.close()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _requests(samples: dict, method: str, code: str) -> float:
    return samples.get(("quartet_rpc_requests_total", (("code", code), ("method", method), ("role", "echo"))), 0.0)


def test_metrics_scraped_over_http_count_every_outcome(server: RunningServer, tokens: dict[str, str]) -> None:
    assert server.metrics_port
    before = _scrape(server.metrics_port)
    assert before[("quartet_service_ready", (("role", "echo"),))] == 1
    assert before[("quartet_service_info", (("backend", "echo"), ("identity", "echo@test"), ("role", "echo")))] == 1
    ok = generator_pb2_grpc.GeneratorStub(open_channel(server.address, token=tokens["token"]))
    admin = generator_pb2_grpc.GeneratorStub(open_channel(server.address, token=tokens["admin_token"]))
    anon = generator_pb2_grpc.GeneratorStub(open_channel(server.address))
    for _ in range(3):
        ok.Generate(generate_request(), timeout=5)
    admin.UpdateWeights(iter(weight_chunks(1)), timeout=5)
    for stub, req, code in ((ok, generate_request(request_id="abort"), "FAILED_PRECONDITION"),
                            (ok, generate_request(request_id="boom"), "INTERNAL"),
                            (ok, generator_pb2.GenerateRequest(), "INVALID_ARGUMENT"),
                            (anon, generate_request(), "UNAUTHENTICATED")):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(req, timeout=5)
        assert err.value.code().name == code
    # A call in flight shows in the gauge while it runs.
    slow = ok.Generate.future(generate_request(), metadata=[("x-sleep", "0.8")], timeout=5)
    time.sleep(0.3)
    during = _scrape(server.metrics_port)
    assert during[("quartet_rpc_in_flight", (("method", "Generate"), ("role", "echo")))] == 1
    slow.result()

    after = _scrape(server.metrics_port)
    assert _requests(after, "Generate", "OK") - _requests(before, "Generate", "OK") == 4
    assert _requests(after, "UpdateWeights", "OK") == 1
    for code in ("FAILED_PRECONDITION", "INTERNAL", "INVALID_ARGUMENT", "UNAUTHENTICATED"):
        assert _requests(after, "Generate", code) == 1, code
    assert after[("quartet_rpc_duration_seconds_count", (("method", "Generate"), ("role", "echo")))] == 8
    assert after[("quartet_rpc_in_flight", (("method", "Generate"), ("role", "echo")))] == 0
    assert not any("Health" in dict(labels).get("method", "") for _, labels in after)


def test_exceptions_map_to_status_codes(server: RunningServer, tokens: dict[str, str]) -> None:
    stub = generator_pb2_grpc.GeneratorStub(open_channel(server.address, token=tokens["token"]))
    bad = generate_request()
    bad.prompt_ids.offsets[:] = [0, 5]  # 3 values, last offset says 5
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(bad, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("prompt_ids.offsets:")
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(generate_request(request_id="boom"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error in /quartet.v1.Generator/Generate: KeyError"
    with pytest.raises(grpc.RpcError) as err:  # an explicit context.abort keeps its own status
        stub.Generate(generate_request(request_id="abort"), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5)
    assert info.limits.max_message_bytes == server.config.max_message_bytes


def test_message_size_limit_from_config(tokens: dict[str, str]) -> None:
    srv = start_server(ROLE, server=ServerConfig(max_message_bytes=4096, metrics_port=None))
    try:
        stub = generator_pb2_grpc.GeneratorStub(open_channel(srv.address))
        assert stub.Generate(generate_request([[1] * 100]), timeout=5).weight_version == 0
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(generate_request([[1] * 1000]), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        srv.stop(grace=0)


def test_ports_in_use_are_bind_errors(server: RunningServer) -> None:
    with pytest.raises(BindError, match="cannot bind gRPC server"):
        start_server(ROLE, server=ServerConfig(port=server.port, metrics_port=None))
    with pytest.raises(BindError, match="cannot bind metrics HTTP server"):
        start_server(ROLE, server=ServerConfig(metrics_port=server.metrics_port))


def test_option_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^options\.max_queue: Input should be greater than 0"):
        start_server(ROLE, options={"max_queue": 0})
    with pytest.raises(ConfigError, match=r"options\.bogus: unknown field\. Valid fields here: block_load, fail_load"):
        start_server(ROLE, options={"bogus": 1})
    with pytest.raises(ConfigError, match="unknown role 'nope'"):
        start_server("nope")
    with pytest.raises(ConfigError, match="cannot be found"):
        start_server("tests.integration.no_such_role")


def test_load_failure_is_raised_and_the_port_released() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServerConfig(port=port, metrics_port=None)
    with pytest.raises(RuntimeError, match="load failed on purpose"):
        start_server(ROLE, options={"fail_load": True}, server=cfg)
    start_server(ROLE, server=cfg).stop(grace=0)


def test_two_servers_in_one_process_have_separate_metrics(server: RunningServer, tokens: dict[str, str]) -> None:
    other = start_server(ROLE)
    try:
        generator_pb2_grpc.GeneratorStub(open_channel(other.address)).Generate(generate_request(), timeout=5)
        assert other.registry.get_sample_value(
            "quartet_rpc_requests_total", {"role": "echo", "method": "Generate", "code": "OK"}) == 1
        assert server.registry.get_sample_value(
            "quartet_rpc_requests_total", {"role": "echo", "method": "Generate", "code": "OK"}) is None
    finally:
        other.stop(grace=0)


def test_server_streaming_methods_are_intercepted(server: RunningServer, tokens: dict[str, str]) -> None:
    def count(token: str | None, n: int) -> list[bytes]:
        channel = open_channel(server.address, token=token)
        try:
            return list(channel.unary_stream("/quartet.test.Echo/Count")(str(n).encode(), timeout=5))
        finally:
            channel.close()

    assert count(tokens["token"], 3) == [b"0", b"1", b"2"]
    with pytest.raises(grpc.RpcError) as err:
        count(None, 3)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:  # fails mid-stream: mapped like any other exception
        count(tokens["token"], 13)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error in /quartet.test.Echo/Count: ValueError"
    value = server.registry.get_sample_value
    for code in ("OK", "UNAUTHENTICATED", "INTERNAL"):
        assert value("quartet_rpc_requests_total", {"role": "echo", "method": "Count", "code": code}) == 1
    assert value("quartet_rpc_in_flight", {"role": "echo", "method": "Count"}) == 0


def test_binding_beyond_loopback_without_tls_or_token_warns(caplog: pytest.LogCaptureFixture) -> None:
    from services.common.server import _warn_exposed

    with caplog.at_level(logging.WARNING):
        _warn_exposed(ServerConfig(host="127.0.0.1"))
        assert not caplog.records
        _warn_exposed(ServerConfig(host="0.0.0.0", token="t"))
        _warn_exposed(ServerConfig(host="10.1.2.3"))
    assert [r.getMessage() for r in caplog.records] == [
        "binding 0.0.0.0 (reachable from other machines) without TLS",
        "binding 10.1.2.3 (reachable from other machines) without TLS and an auth token",
    ]
