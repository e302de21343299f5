"""Prometheus metrics of the runtime: per-RPC counters, latency and in-flight calls, service info.

Everything lives on a per-server CollectorRegistry, never the global one: tests (and the embedded
launcher) run several servers in one process, and each must expose only its own numbers. Roles add
their own metrics to the same registry (RoleContext.registry).
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.common.interceptors import Around, aborted, is_exempt, method_name, wrap_handler

log = logging.getLogger(__name__)

# From 1 ms (GetInfo) to minutes (a large Generate batch or a weight update on CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RuntimeMetrics:
    """The runtime's own metrics for one server."""

    def __init__(self, registry: CollectorRegistry, role: str) -> None:
        self.role = role
        self.requests = Counter(
            "quartet_rpc_requests", "RPCs finished, by method and status code.",
            ["role", "method", "code"], registry=registry,
        )
        self.duration = Histogram(
            "quartet_rpc_duration_seconds", "Time from call start to its last response, in seconds.",
            ["role", "method"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge("quartet_rpc_in_flight", "RPCs being handled now.", ["role", "method"], registry=registry)
        self.info = Gauge(
            "quartet_service_info", "Always 1; labels say what this service is.",
            ["role", "backend", "identity"], registry=registry,
        )
        self.ready = Gauge("quartet_service_ready", "1 while health is SERVING, else 0.", ["role"], registry=registry)
        self.ready.labels(role).set(0)
        # Peak, not current, resident memory: what sizes a container's memory limit. Read at scrape time.
        self.peak_rss = Gauge("quartet_peak_rss_bytes", "Peak resident memory of this process (ru_maxrss), in bytes.",
                              ["role"], registry=registry)
        self.peak_rss.labels(role).set_function(peak_rss_bytes)

    def set_info(self, backend: str, identity: str) -> None:
        self.info.clear()
        self.info.labels(self.role, backend, identity).set(1)

    def set_ready(self, ready: bool) -> None:
        self.ready.labels(self.role).set(1 if ready else 0)


def peak_rss_bytes() -> float:
    """This process's peak resident set size in bytes (Linux reports ru_maxrss in KiB)."""
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class _Measure(Around):
    def __init__(self, metrics: RuntimeMetrics, method: str) -> None:
        self.metrics = metrics
        self.method = method

    def _start(self) -> float:
        self.metrics.in_flight.labels(self.metrics.role, self.method).inc()
        return time.perf_counter()

    def _finish(self, start: float, code: grpc.StatusCode) -> None:
        m = self.metrics
        m.in_flight.labels(m.role, self.method).dec()
        m.duration.labels(m.role, self.method).observe(time.perf_counter() - start)
        m.requests.labels(m.role, self.method, code.name).inc()

    @staticmethod
    def _code(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
        if aborted(context):
            return context.code()
        # An exception that no inner interceptor turned into a status: grpc reports UNKNOWN.
        return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK

    def unary(self, invoke: Callable[[], Any], context: grpc.ServicerContext) -> Any:
        start, failed = self._start(), True
        try:
            result = invoke()
            failed = False
            return result
        finally:
            self._finish(start, self._code(context, failed))

    def stream(self, invoke: Callable[[], Iterator[Any]], context: grpc.ServicerContext) -> Iterator[Any]:
        start, failed = self._start(), True
        try:
            yield from invoke()
            failed = False
        except GeneratorExit:
            failed = False  # the client went away mid-stream; recorded as CANCELLED below
            raise
        finally:
            code = self._code(context, failed)
            if code == grpc.StatusCode.OK and not context.is_active():
                code = grpc.StatusCode.CANCELLED
            self._finish(start, code)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts, times and gauges every role RPC (health and reflection are left out)."""

    def __init__(self, metrics: RuntimeMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_exempt(method):
            return handler
        return wrap_handler(handler, _Measure(self.metrics, method_name(method)))


@dataclass
class MetricsEndpoint:
    """The Prometheus HTTP server of one service."""

    host: str
    port: int
    _server: Any
    _thread: Any

    def stop(self) -> None:
        """Close the endpoint in the background: shutdown() waits out the server's 0.5 s poll."""

        def close() -> None:
            self._server.shutdown()
            self._server.server_close()

        threading.Thread(target=close, name="quartet-metrics-stop", daemon=True).start()


def start_metrics_http(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve `registry` at http://host:port/metrics; port 0 picks a free port."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    actual = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, actual)
    return MetricsEndpoint(host=host, port=actual, _server=server, _thread=thread)
