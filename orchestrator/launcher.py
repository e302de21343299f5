"""The embedded stack: the four roles as child processes on free loopback ports.

Each service is `quartet serve --config FILE` run by this interpreter, on port 0, with a ready file
(address, ports, pid) written once it is SERVING, fresh random tokens passed in environment
variables (never on the command line, where `ps` would show them), and its output in a log file in
the run directory.

No orphans: every child runs in its own session (so a Ctrl-C in the terminal reaches only the
orchestrator, which then stops the children in order: SIGTERM, then SIGKILL after a grace period),
is stopped by `atexit` and by a SIGTERM handler, and asks the kernel to SIGTERM it if the
orchestrator dies without cleaning up (kill -9): PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOKEN_ENV = "QUARTET_TOKEN"
ADMIN_TOKEN_ENV = "QUARTET_ADMIN_TOKEN"
_PR_SET_PDEATHSIG = 1


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


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalStack:
    """Start, wait for and stop the local services. Use as a context manager."""

    def __init__(self, run_dir: str | Path, specs: list[ServiceSpec], *, startup_timeout_s: float = 180.0,
                 grace_s: float = 5.0, dtype: str = "float32", device: str = "cpu") -> None:
        self.dir = Path(run_dir) / "services"
        self.specs = specs
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self.dtype, self.device = dtype, device
        self.procs: dict[str, subprocess.Popen] = {}
        self.services: dict[str, LaunchedService] = {}
        self._lock = threading.Lock()
        self._prev_sigterm: Any = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> dict[str, LaunchedService]:
        """Start every service at once (they load in parallel), then wait until all serve."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        if threading.current_thread() is threading.main_thread():
            self._prev_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            pending = {spec.label: self._spawn(spec) for spec in self.specs}
            deadline = time.monotonic() + self.startup_timeout_s
            for label, (spec, ready, token, admin) in pending.items():
                self.services[label] = self._wait(spec, ready, token, admin, deadline)
        except BaseException:
            self.stop()
            raise
        return self.services

    def _spawn(self, spec: ServiceSpec) -> tuple[ServiceSpec, Path, str, str]:
        label = spec.label
        ready = self.dir / f"{label}.ready.json"
        ready.unlink(missing_ok=True)
        config = {
            "role": spec.role,
            "model": {"path": spec.model_path, "dtype": self.dtype, "device": self.device},
            "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "grace_seconds": 2.0},
            "ready_file": str(ready),
            "options": spec.options,
        }
        if spec.checkpoint_dir:
            config["checkpoint_dir"] = spec.checkpoint_dir
        cfg_path = self.dir / f"{label}.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        token, admin = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        # Only the tokens among QUARTET_* settings: the parent's own (a config path, a port) must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUARTET_")}
        env.update({TOKEN_ENV: token, ADMIN_TOKEN_ENV: admin})
        env.setdefault("OMP_NUM_THREADS", "1")
        log = (self.dir / f"{label}.log").open("ab")
        cmd = [sys.executable, "-m", "cli.main", "serve", "--config", str(cfg_path)]
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=_die_with_parent, cwd=os.getcwd(),
        )
        log.close()
        with self._lock:
            self.procs[label] = proc
        return spec, ready, token, admin

    def _wait(self, spec: ServiceSpec, ready: Path, token: str, admin: str, deadline: float) -> LaunchedService:
        from services.common.channel import health_status, open_channel

        label, proc, log = spec.label, self.procs[spec.label], self.dir / f"{spec.label}.log"
        info: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LaunchError(f"local {label} service exited with code {proc.returncode}; log {log}:\n{_tail(log)}")
            if info is None and ready.is_file():
                with contextlib.suppress(ValueError):
                    info = json.loads(ready.read_text())
            if info is not None:
                channel = open_channel(info["address"], token=token)
                try:
                    if health_status(channel, timeout=2.0) == "SERVING":
                        return LaunchedService(label, spec.role, info["address"], int(info["port"]),
                                               info.get("metrics_port"), proc.pid, log, token, admin)
                finally:
                    channel.close()
            time.sleep(0.05)
        raise LaunchError(
            f"local {label} service not SERVING after {self.startup_timeout_s:.0f} s "
            f"(raise services.local_options.startup_timeout_s if the model is large); log {log}:\n{_tail(log)}"
        )

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stop()
        raise SystemExit(128 + signum)

    def stop(self) -> None:
        """SIGTERM every child's process group, SIGKILL what is left after the grace period."""
        with self._lock:
            procs, self.procs = dict(self.procs), {}
        for proc in procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.services.values()]
