"""The embedded stack: the four roles as child processes on free loopback ports, supervised.

Each service is `python -m services serve --config FILE` run by this interpreter, on port 0, with a ready file
(address, ports, pid) written once it is SERVING, fresh random tokens passed in environment
variables (never on the command line, where `ps` would show them), and its output in a log file in
the run directory. With `TlsFiles` every child serves TLS (mTLS when a client certificate is given)
and the launcher's own health checks use the same credentials.

Supervision: once the stack is up, a monitor thread notices a child that exited on its own and
restarts it after an exponential backoff (`RestartPolicy`) on the SAME port with the same tokens,
appending to the same log, so the orchestrator's channels reconnect to the address they already
have. A service that used up `max_restarts` is left dead: the orchestrator's retry budget then fails
the run with an error naming it. stop() never restarts anything.

No orphans: every child runs in its own session (so a Ctrl-C in the terminal reaches only the
orchestrator, which then stops the children in order: SIGTERM, then SIGKILL after a grace period),
is stopped by `atexit` and by a SIGTERM handler, and asks the kernel to SIGTERM it if the
orchestrator dies without cleaning up (kill -9): PR_SET_PDEATHSIG. A crashed child's process group
is killed before its replacement starts, so helpers it forked (reward workers) do not linger.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from services.launch_spec import LaunchedService, LaunchError, RestartPolicy, ServiceSpec, TlsFiles

__all__ = ["LaunchError", "LaunchedService", "LocalStack", "RestartPolicy", "ServiceSpec", "TlsFiles"]

if TYPE_CHECKING:
    import grpc

TOKEN_ENV = "QUARTET_TOKEN"
ADMIN_TOKEN_ENV = "QUARTET_ADMIN_TOKEN"
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.1

log = logging.getLogger("quartet.launcher")


@dataclass
class _Child:
    """Supervision state of one label: what to start again and with which identity."""

    spec: ServiceSpec
    token: str
    admin_token: str
    proc: subprocess.Popen
    port: int = 0  # 0 until the first start reports its port; restarts bind this one again
    restarts: int = 0  # restarts begun so far
    state: Literal["running", "backoff", "starting", "gave_up"] = "running"
    due: float = 0.0  # monotonic time: end of the backoff, or the deadline of a starting restart
    last_code: int | None = None  # exit code of the child that died last


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalStack:
    """Start, wait for, supervise and stop the local services. Use as a context manager.

    `restarts` counts restarts per label; `gave_up` lists labels left dead after max_restarts.
    `on_restart(label, exit_code)` is called (from the monitor's thread) before each restart.
    """

    def __init__(self, run_dir: str | Path, specs: list[ServiceSpec], *, startup_timeout_s: float = 180.0,
                 grace_s: float = 5.0, dtype: str = "float32", device: str = "cpu",
                 restart: RestartPolicy | None = None, tls: TlsFiles | None = None,
                 on_restart: Callable[[str, int], None] | None = None) -> None:
        self.dir = Path(run_dir) / "services"
        self.specs = specs
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self.dtype, self.device = dtype, device
        self.restart = restart or RestartPolicy()
        self.tls = tls
        self.on_restart = on_restart
        self.services: dict[str, LaunchedService] = {}
        self._children: dict[str, _Child] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor_thread: threading.Thread | None = None
        self._prev_sigterm: Any = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> dict[str, LaunchedService]:
        """Start every service at once (they load in parallel), wait until all serve, then supervise.

        Call it from a thread that outlives the stack (the main thread): the children's PDEATHSIG is
        tied to the thread that started them.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        atexit.register(self.stop)
        if threading.current_thread() is threading.main_thread():
            self._prev_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            for spec in self.specs:
                token, admin = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
                self._children[spec.label] = _Child(spec, token, admin, self._spawn(spec, token, admin, port=0))
            deadline = time.monotonic() + self.startup_timeout_s
            for label, child in self._children.items():
                self.services[label] = self._wait(child, deadline)
                child.port = self.services[label].port
        except BaseException:
            self.stop()
            raise
        self._monitor_thread = threading.Thread(target=self._monitor, name="quartet-launcher-monitor", daemon=True)
        self._monitor_thread.start()
        return self.services

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        """The current child process of each label."""
        with self._lock:
            return {label: c.proc for label, c in self._children.items()}

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far per label (attempts, whether or not they came back)."""
        with self._lock:
            return {label: c.restarts for label, c in self._children.items()}

    @property
    def gave_up(self) -> list[str]:
        """Labels left dead after max_restarts."""
        with self._lock:
            return [label for label, c in self._children.items() if c.state == "gave_up"]

    def _spawn(self, spec: ServiceSpec, token: str, admin: str, *, port: int) -> subprocess.Popen:
        label = spec.label
        ready = self.dir / f"{label}.ready.json"
        ready.unlink(missing_ok=True)
        server: dict[str, Any] = {"host": "127.0.0.1", "port": port, "metrics_port": 0, "grace_seconds": 2.0}
        if self.tls is not None:
            server.update(self.tls.server_section())
        config = {
            "role": spec.role,
            "model": {"path": spec.model_path, "dtype": self.dtype, "device": self.device},
            "server": server,
            "ready_file": str(ready),
            "options": spec.options,
        }
        if spec.checkpoint_dir:
            config["checkpoint_dir"] = spec.checkpoint_dir
        cfg_path = self.dir / f"{label}.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # Only the tokens among QUARTET_* settings: the parent's own (a config path, a port) must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUARTET_")}
        env.update({TOKEN_ENV: token, ADMIN_TOKEN_ENV: admin})
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "services", "serve", "--config", str(cfg_path)]
        with (self.dir / f"{label}.log").open("ab") as out:
            return subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=_die_with_parent, cwd=os.getcwd(),
            )

    def _health_channel(self, address: str, token: str) -> grpc.Channel:
        from services.common.channel import open_channel

        t = self.tls
        if t is None:
            return open_channel(address, token=token)
        return open_channel(address, token=token, root_cert=t.ca, client_cert=t.client_cert, client_key=t.client_key)

    def _probe(self, child: _Child, proc: subprocess.Popen) -> LaunchedService | None:
        """The child as launched once its ready file exists and health says SERVING; else None."""
        from services.common.channel import health_status

        spec = child.spec
        ready = self.dir / f"{spec.label}.ready.json"
        try:
            info = json.loads(ready.read_text())
        except (OSError, ValueError):  # not written yet (it is written atomically, but may be absent)
            return None
        channel = self._health_channel(info["address"], child.token)
        try:
            if health_status(channel, timeout=1.0) != "SERVING":
                return None
        finally:
            channel.close()
        return LaunchedService(spec.label, spec.role, info["address"], int(info["port"]), info.get("metrics_port"),
                               proc.pid, self.dir / f"{spec.label}.log", child.token, child.admin_token)

    def _wait(self, child: _Child, deadline: float) -> LaunchedService:
        label, proc, log_path = child.spec.label, child.proc, self.dir / f"{child.spec.label}.log"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LaunchError(f"local {label} service exited with code {proc.returncode}; log {log_path}:\n{_tail(log_path)}")
            up = self._probe(child, proc)
            if up is not None:
                return up
            time.sleep(0.05)
        raise LaunchError(
            f"local {label} service not SERVING after {self.startup_timeout_s:.0f} s "
            f"(raise services.local_options.startup_timeout_s if the model is large); log {log_path}:\n{_tail(log_path)}"
        )

    # -- supervision -----------------------------------------------------------------------------
    # One thread does all of it, spawning included: PR_SET_PDEATHSIG fires when the *thread* that
    # forked a child exits, so a child started from a short-lived thread would be SIGTERMed at once.

    def _monitor(self) -> None:
        while not self._stopping.wait(_POLL_S):
            for child in list(self._children.values()):
                if self._stopping.is_set():
                    return
                try:
                    self._supervise(child)
                except Exception:  # one child's trouble (a full disk for its log) must not end all supervision
                    log.exception("supervising the local %s service failed; trying again", child.spec.label)

    def _supervise(self, child: _Child) -> None:
        """Advance one child: running -> backoff (it exited) -> starting (respawned) -> running | backoff."""
        label, now = child.spec.label, time.monotonic()
        if child.state == "running" and child.proc.poll() is not None:
            self._crashed(child, f"exited with code {child.proc.returncode}")
        elif child.state == "backoff" and now >= child.due:
            self._respawn(child)
        elif child.state == "starting":
            if child.proc.poll() is not None:
                self._crashed(child, f"restart {child.restarts} exited with code {child.proc.returncode} before SERVING")
            elif now >= child.due:
                self._kill(child.proc)
                self._crashed(child, f"restart {child.restarts} not SERVING after {self.startup_timeout_s:.0f} s")
            elif (up := self._probe(child, child.proc)) is not None:
                child.state = "running"
                self.services[label] = up
                log.warning("local %s service is SERVING again at %s (restart %d, pid %d)",
                            label, up.address, child.restarts, up.pid)

    def _crashed(self, child: _Child, what: str) -> None:
        """Schedule the next restart after its backoff, or give up after max_restarts."""
        label, policy, code = child.spec.label, self.restart, child.proc.returncode
        if self._stopping.is_set():  # stop() ended it: nothing crashed
            return
        # Helpers the dead child forked share its process group: end them before the next one starts.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        if child.restarts >= policy.max_restarts:
            child.state = "gave_up"
            log.error("local %s service %s and has used all %d restarts (services.local_options.max_restarts): "
                      "leaving it stopped; log %s", label, what, policy.max_restarts, self.dir / f"{label}.log")
            return
        n = child.restarts + 1
        delay = policy.delay(n)
        child.state, child.due, child.last_code = "backoff", time.monotonic() + delay, code
        log.warning("local %s service %s: restart %d of %d on port %d in %.1f s",
                    label, what, n, policy.max_restarts, child.port, delay)

    def _respawn(self, child: _Child) -> None:
        """Start the replacement on the same port with the same tokens, appending to the same log."""
        label, n = child.spec.label, child.restarts + 1
        if self.on_restart is not None:
            with contextlib.suppress(Exception):
                self.on_restart(label, child.last_code)
        with (self.dir / f"{label}.log").open("a") as out:
            out.write(f"--- quartet launcher: restart {n} after exit code {child.last_code}, port {child.port} ---\n")
        # Under the lock, so stop() either sees the new child or has already stopped us from starting it.
        with self._lock:
            if self._stopping.is_set():
                return
            child.restarts = n
            child.proc = self._spawn(child.spec, child.token, child.admin_token, port=child.port)
            child.state, child.due = "starting", time.monotonic() + self.startup_timeout_s

    def _kill(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # -- stopping --------------------------------------------------------------------------------

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stop()
        raise SystemExit(128 + signum)

    def stop(self) -> None:
        """Stop supervising, then SIGTERM every child's process group, SIGKILL what is left after the grace period."""
        with self._lock:
            self._stopping.set()
            procs = [c.proc for c in self._children.values()]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                self._kill(proc)
        monitor, self._monitor_thread = self._monitor_thread, None
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout=self.grace_s)
        if self._prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.services.values()]
