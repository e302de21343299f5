"""The one server runtime every role runs in.

`start_server` builds a gRPC server around a role (auth, status mapping and metrics interceptors,
health, reflection, optional TLS / mTLS, a Prometheus endpoint), starts it with health NOT_SERVING,
loads the role, then marks it SERVING. `serve_role` is the same for the CLI: it also handles
SIGTERM/SIGINT (health NOT_SERVING, stop accepting, let in-flight calls finish within the grace
period, `role.close()`, exit 0) and writes a ready file for launchers.

We use the sync `grpc.server` with a thread pool rather than grpc.aio: the backends are torch-bound
and release the GIL inside kernels, so threads overlap real work; the generator batches across
callers with its own worker thread, which callers simply block on; and the sync server is the
mature path for interceptors, health and reflection.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from services.common.auth import AuthInterceptor, AuthPolicy
from services.common.config import ServerConfig
from services.common.interceptors import ErrorInterceptor
from services.common.memory import tune_malloc_for_large_messages
from services.common.metrics import MetricsEndpoint, MetricsInterceptor, RuntimeMetrics, start_metrics_http
from services.common.role import ModelConfig, Role, RoleContext
from services.common.roles import resolve_role

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BindError(OSError):
    """The gRPC port could not be bound (in use, or the address is not local)."""


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _connect_host(host: str) -> str:
    """Where a local client reaches a server bound to `host` (wildcards mean loopback)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _warn_exposed(cfg: ServerConfig) -> None:
    if is_loopback(cfg.host):
        return
    missing = [what for what, ok in (("TLS", cfg.tls_enabled), ("an auth token", cfg.auth_enabled)) if not ok]
    if not missing:
        return
    message = f"binding {cfg.host} (reachable from other machines) without {' and '.join(missing)}"
    log.warning(message)
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]WARNING:[/] {message}; set --tls-cert/--tls-key and --token.")


def _server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials:
    assert cfg.tls_cert is not None and cfg.tls_key is not None
    pair = (Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())
    ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def build_grpc_server(cfg: ServerConfig, interceptors: list[grpc.ServerInterceptor]) -> tuple[grpc.Server, int]:
    """An unstarted grpc.Server bound to cfg.host:cfg.port; returns it and the bound port."""
    tune_malloc_for_large_messages()  # received weight chunks reuse heap buffers (services/common/memory.py)
    options = [
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        # Off so that binding a port another process holds fails instead of silently sharing it.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="quartet-rpc"),
        interceptors=interceptors,
        options=options,
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
    )
    address = join_host_port(cfg.host, cfg.port)
    try:
        if cfg.tls_enabled:
            port = server.add_secure_port(address, _server_credentials(cfg))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise BindError(f"cannot bind gRPC server to {address}: port in use or address not local") from e
    return server, port


class RunningServer:
    """A started server around one role. `stop()` drains it; safe to call more than once."""

    def __init__(self, *, role_name: str, role: Role, config: ServerConfig, grpc_server: grpc.Server, port: int,
                 registry: CollectorRegistry, metrics: RuntimeMetrics, health_servicer: health.HealthServicer,
                 metrics_endpoint: MetricsEndpoint | None) -> None:
        self.role_name = role_name
        self.role = role
        self.config = config
        self.port = port
        self.address = join_host_port(_connect_host(config.host), port)
        self.registry = registry
        self.metrics = metrics
        self.health = health_servicer
        self.metrics_port = metrics_endpoint.port if metrics_endpoint is not None else None
        self.load_error: BaseException | None = None
        self._grpc = grpc_server
        self._metrics_endpoint = metrics_endpoint
        self._ready = threading.Event()
        self._load_done = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()
        self._on_drain: list[Callable[[], None]] = []

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the role loaded (True) or `timeout` passed (False); re-raise a load failure."""
        self._load_done.wait(timeout)
        if self.load_error is not None:
            raise self.load_error
        return self._ready.is_set()

    def on_drain(self, callback: Callable[[], None]) -> None:
        """Run `callback` when draining starts (e.g. remove a ready file)."""
        self._on_drain.append(callback)

    def _load(self) -> None:
        try:
            self.role.load()
        except BaseException as e:
            self.load_error = e
            log.exception("loading role %s failed", self.role_name)
            self._load_done.set()
            return
        with self._lock:
            if not self._stopping:
                identity = getattr(self.role, "identity", "") or f"{self.role_name}@{socket.gethostname()}"
                self.metrics.set_info(str(getattr(self.role, "backend", "") or ""), str(identity))
                for service in ("", self.role.service_name):
                    self.health.set(service, SERVING)
                self.metrics.set_ready(True)
                self._ready.set()
                log.info("role %s loaded; health SERVING at %s", self.role_name, self.address)
        self._load_done.set()

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, stop accepting, let in-flight calls run up to `grace` s, close the role."""
        with self._lock:
            already = self._stopping
            self._stopping = True
        if already:
            self._stopped.wait()
            return
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.metrics.set_ready(False)
        self._ready.clear()
        for callback in self._on_drain:
            callback()
        log.info("draining %s (grace %.1f s)", self.role_name, grace)
        self._grpc.stop(grace).wait(grace + 5)
        _close_quietly(self.role, self.role_name)
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()
        self._stopped.set()
        log.info("stopped %s", self.role_name)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def _close_quietly(role: Role, name: str) -> None:
    try:
        role.close()
    except Exception:
        log.exception("role %s close() failed", name)


def _assemble(name: str, role: Role, cfg: ServerConfig, registry: CollectorRegistry,
              metrics: RuntimeMetrics) -> RunningServer:
    """Bind, register health, the role and reflection, start metrics, start serving (NOT_SERVING)."""
    admin = frozenset(role.admin_methods)
    if not cfg.auth_enabled:
        log.warning("no token configured: auth is OFF for %s", name)
    elif cfg.admin_token is None and admin:
        log.warning("no admin token: the call token also authorises %s", ", ".join(sorted(admin)))
    _warn_exposed(cfg)
    interceptors = [
        MetricsInterceptor(metrics),
        AuthInterceptor(AuthPolicy(cfg.token, cfg.admin_token, admin)),
        ErrorInterceptor(),
    ]
    grpc_server, port = build_grpc_server(cfg, interceptors)
    health_servicer = health.HealthServicer()
    for service in ("", role.service_name):
        health_servicer.set(service, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    role.add_to_server(grpc_server)
    reflection.enable_server_reflection((role.service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server)
    endpoint = None
    if cfg.metrics_port is not None:
        try:
            endpoint = start_metrics_http(registry, (cfg.metrics_host or cfg.host).strip("[]"), cfg.metrics_port)
        except OSError as e:
            grpc_server.stop(0)
            raise BindError(f"cannot bind metrics HTTP server to port {cfg.metrics_port}: {e.strerror}") from e
    grpc_server.start()
    running = RunningServer(
        role_name=name, role=role, config=cfg, grpc_server=grpc_server, port=port, registry=registry,
        metrics=metrics, health_servicer=health_servicer, metrics_endpoint=endpoint,
    )
    log.info("%s listening on %s (tls=%s, auth=%s, metrics port=%s)", name, running.address,
             "on" if cfg.tls_enabled else "off", "on" if cfg.auth_enabled else "off", running.metrics_port)
    return running


def start_server(
    role_name: str,
    *,
    model: ModelConfig | None = None,
    options: dict[str, Any] | BaseModel | None = None,
    server: ServerConfig | None = None,
    wait_ready: bool = True,
    checkpoint_dir: str | Path | None = None,
    extra: dict[str, str] | None = None,
) -> RunningServer:
    """Build and start a server for `role_name` (built-in name or dotted module path).

    With wait_ready=True the role is loaded before returning (a load failure stops the server and
    is raised); with wait_ready=False it loads in a background thread, health moving from
    NOT_SERVING to SERVING when it finishes (`RunningServer.wait_ready`). Config errors raise
    ConfigError naming the field; a port that cannot be bound raises BindError.
    """
    cfg = server or ServerConfig()
    spec = resolve_role(role_name)
    role_options = spec.parse_options(options)
    registry = CollectorRegistry(auto_describe=True)
    metrics = RuntimeMetrics(registry, spec.name)
    ctx = RoleContext(
        model=model or ModelConfig(), registry=registry, max_message_bytes=cfg.max_message_bytes,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None, extra=dict(extra or {}),
    )
    role = spec.create(ctx, role_options)
    try:
        running = _assemble(spec.name, role, cfg, registry, metrics)
    except BaseException:
        _close_quietly(role, spec.name)
        raise
    if not wait_ready:
        threading.Thread(target=running._load, name=f"quartet-load-{spec.name}", daemon=True).start()
        return running
    running._load()
    if running.load_error is not None:
        running.stop(grace=0)
        raise running.load_error
    return running


def write_ready_file(path: str | Path, running: RunningServer) -> None:
    """Write {"address", "port", "metrics_port", "pid"} atomically (tmp file + rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"address": running.address, "port": running.port, "metrics_port": running.metrics_port,
               "pid": os.getpid(), "role": running.role_name}
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, target)


def serve_role(
    role_name: str,
    *,
    model: ModelConfig | None = None,
    options: dict[str, Any] | BaseModel | None = None,
    server: ServerConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    ready_file: str | Path | None = None,
    extra: dict[str, str] | None = None,
) -> int:
    """Serve a role until SIGTERM/SIGINT, then drain; returns the process exit code.

    0 after a graceful drain (also when stopped while still loading), 1 if the role failed to load.
    A second signal during the drain exits immediately with 1.
    """
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop_requested.is_set():
            log.error("second %s while draining: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: draining", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = start_server(role_name, model=model, options=options, server=server, wait_ready=False,
                               checkpoint_dir=checkpoint_dir, extra=extra)
        if ready_file is not None:
            running.on_drain(lambda: Path(ready_file).unlink(missing_ok=True))
        # Short waits keep the main thread responsive to signals on every platform.
        while not stop_requested.is_set() and not running._load_done.wait(0.2):
            pass
        if running.load_error is not None:
            running.stop(grace=0)
            return 1
        if running.ready and ready_file is not None:
            write_ready_file(ready_file, running)
        while not stop_requested.wait(0.5):
            pass
        running.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.stdout.flush()
