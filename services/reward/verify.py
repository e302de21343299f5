"""A pool of worker processes that run verifiers with a hard timeout per unit of work.

Why processes, and why not `concurrent.futures.ProcessPoolExecutor`:
- Verifiers (sympy, math-verify, a user's regex or plugin) can hang or crash on a pathological
  answer. Threads cannot be stopped, and math-verify's own timeout uses SIGALRM, which works only
  in a process's main thread (elsewhere it times out silently or hangs). A worker process can be killed.
- ProcessPoolExecutor cannot kill one stuck worker: terminating one breaks the whole executor and
  every future in flight, and it has no way to report progress inside a task. So one task per
  sample (costly round trips) would be the only way to get per-sample timeouts from it.

Design (one round trip per chunk in the common case, yet a timeout per unit):
- Each call splits its units (one sample each for rules; `plugin_batch_size` samples for plugins)
  into one contiguous chunk per worker it checked out, and sends each worker its chunk in one
  message.
- Before each unit the worker stamps (unit index, start time) into a small shared-memory array.
  `time.monotonic` is CLOCK_MONOTONIC, system-wide on Linux, so the parent can compare stamps.
- The parent sleeps on the workers' pipes until the earliest deadline (start + timeout x unit
  size). A worker past its deadline is SIGKILLed, the unit it was on is reported as a timeout,
  a replacement process is started at once, and the chunk's unfinished units go to it.
- The worker sends results at the end of a chunk, and also between units whenever
  `flush_seconds` passed since its last message, so a kill loses at most that much finished work
  (re-run on the replacement; verifiers are pure functions of their input).

Workers are fresh interpreters (see `_Worker`; their side is worker.py) that import only
worker.py, the rule module and the plugin, never torch or the gRPC server (forking a multi-threaded gRPC process is unsafe).
Start-up, including the scorer's warm-up, is paid once per pool (in `start()`, i.e. at service
load), and again only for a replacement after a kill.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Literal

from services.reward.worker import PROGRESS_BYTES, ScorerSpec, Unit

log = logging.getLogger(__name__)

__all__ = ["ScorerSpec", "Unit", "UnitOutcome", "VerifierPool"]


@dataclass(frozen=True)
class UnitOutcome:
    """What happened to one unit.

    status: "ok" (values holds one float per sample), "error" (the scorer raised; error is
        "ExceptionType: message"), "timeout" (killed past its deadline) or "crash" (the worker
        process died while on it; error gives the exit code).
    """

    status: Literal["ok", "error", "timeout", "crash"]
    values: tuple[float, ...] = ()
    error: str = ""


class _Worker:
    """One worker process, its socket and its shared progress stamp.

    A plain `python -c` subprocess rather than multiprocessing's "spawn": spawn re-imports the
    parent's __main__ (the CLI, or a script importing torch) in every child, which costs seconds
    and hundreds of MB per worker. The child imports worker.py and the scorer only. The
    progress stamp lives in a memfd both processes map; the socket carries pickled messages.
    """

    def __init__(self, spec: ScorerSpec, flush_seconds: float) -> None:
        parent_sock, child_sock = socket.socketpair()
        pfd = os.memfd_create("quartet-reward-progress")
        os.ftruncate(pfd, PROGRESS_BYTES)
        self.progress = memoryview(mmap.mmap(pfd, PROGRESS_BYTES)).cast("d")
        self.progress[0] = -1.0
        cfd = child_sock.fileno()
        code = f"from services.reward.worker import worker_entry; worker_entry({cfd}, {pfd})"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(cfd, pfd), env=env,
                                        stdin=subprocess.DEVNULL)
        child_sock.close()
        os.close(pfd)
        self.conn = Connection(parent_sock.detach())
        self.conn.send((spec, flush_seconds))
        self.ready = False
        self.dead = False
        self.init_error = ""  # what a replacement reported if it failed to start (e.g. the plugin file broke)

    def recv_startup(self, timeout: float) -> None:
        """Wait for the worker's "ready"; RuntimeError with the worker's own error otherwise."""
        if not self.conn.poll(timeout):
            raise RuntimeError(f"reward worker did not start within {timeout:.0f} s")
        try:
            msg = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"reward worker exited during start-up (exit code {self.process.poll()})") from None
        if msg[0] != "ready":
            raise RuntimeError(f"reward worker failed to start: {msg[1]}")
        self.ready = True

    def poll_ready(self) -> bool:
        """Whether the worker has started up, reading its "ready" if it arrived (idle workers only)."""
        if not self.ready and not self.dead:
            try:
                if self.conn.poll():
                    self.note_startup(self.conn.recv())
            except (EOFError, OSError):
                self.dead = True
        return self.ready

    def note_startup(self, msg: tuple[str, ...]) -> None:
        self.ready = msg[0] == "ready"
        if msg[0] == "init_error":
            self.init_error = msg[1]

    def exitcode(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.conn.close()
        self.dead = True


@dataclass
class _Chunk:
    """Units (global indices) assigned to one worker, and how many of them are resolved."""

    indices: list[int]
    job: int
    done: int = 0


class VerifierPool:
    """`workers` processes running one scorer; `run(units)` scores a batch with per-unit deadlines.

    Concurrent `run` calls share the pool: each checks out the workers that are idle (waiting for
    at least one) and returns them when done.
    """

    def __init__(self, spec: ScorerSpec, *, workers: int, timeout_seconds: float,
                 flush_seconds: float | None = None,
                 on_restart: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.n_workers = workers
        self.timeout = timeout_seconds
        # Flushing a few times per timeout bounds the finished work lost to a kill.
        self.flush_seconds = flush_seconds if flush_seconds is not None else max(0.01, timeout_seconds / 4)
        self.on_restart = on_restart or (lambda reason: None)
        self._idle: list[_Worker] = []
        self._cond = threading.Condition()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._jobs = 0
        self._closed = False

    def start(self, startup_timeout: float = 120.0) -> None:
        """Start every worker and wait until each has imported its scorer."""
        workers = [self._spawn() for _ in range(self.n_workers)]
        try:
            deadline = time.monotonic() + startup_timeout
            for w in workers:
                w.recv_startup(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.close()
            raise
        self._checkin(workers)

    def _spawn(self) -> _Worker:
        w = _Worker(self.spec, self.flush_seconds)
        with self._lock:
            self._all.add(w)
        return w

    def _replace(self, w: _Worker, reason: str) -> _Worker:
        w.kill()
        with self._lock:
            self._all.discard(w)
        if self._closed:  # shutting down: no new process may outlive close()
            raise RuntimeError("the reward worker pool was closed during the call")
        self.on_restart(reason)
        return self._spawn()

    def close(self) -> None:
        """Stop every worker (idle or not); later `run` calls fail."""
        self._closed = True
        with self._lock:
            workers, self._all = list(self._all), set()
        for w in workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(None)
            w.kill()

    def _checkout(self, want: int) -> list[_Worker]:
        """Up to `want` idle workers (at least one, waiting for it), started-up ones first: a call
        should not wait for a replacement's boot while a ready worker sits idle."""
        with self._cond:
            while not self._idle:
                if self._closed:
                    raise RuntimeError("the reward worker pool is closed")
                self._cond.wait(0.5)
            if self._closed:
                raise RuntimeError("the reward worker pool is closed")
            self._idle.sort(key=lambda w: w.poll_ready())
            got = [self._idle.pop() for _ in range(min(want, len(self._idle)))]
        return got

    def _checkin(self, workers: list[_Worker]) -> None:
        with self._cond:
            self._idle.extend(w for w in workers if not w.dead and not self._closed)
            self._cond.notify_all()

    def run(self, units: Sequence[Unit]) -> list[UnitOutcome]:
        """Score every unit; each gets timeout_seconds x its sample count once its worker starts it."""
        if not units:
            return []
        workers = self._checkout(len(units))
        try:
            return _Run(self, list(units), workers).execute()
        finally:
            self._checkin(workers)

    def next_job(self) -> int:
        with self._lock:
            self._jobs += 1
            return self._jobs


class _Run:
    """The scheduling loop of one `VerifierPool.run` call over the workers it checked out."""

    def __init__(self, pool: VerifierPool, units: list[Unit], workers: list[_Worker]) -> None:
        self.pool, self.units, self.workers = pool, units, workers
        self.outcomes: list[UnitOutcome | None] = [None] * len(units)
        n, k = len(units), len(workers)
        bounds = [round(i * n / k) for i in range(k + 1)]
        self.pending: deque[list[int]] = deque(
            list(range(bounds[i], bounds[i + 1])) for i in range(k) if bounds[i + 1] > bounds[i]
        )
        self.active: dict[_Worker, _Chunk] = {}

    def execute(self) -> list[UnitOutcome]:
        idle = list(self.workers)
        while self.pending or self.active:
            self._dispatch(idle)
            booting = [w for w in idle if not w.ready and not w.dead]
            ready = wait([w.conn for w in self.active] + [w.conn for w in booting], timeout=self._wait_seconds())
            for w in booting:
                if w.conn in ready:
                    self._drain(w)  # reads the replacement's "ready"
            for w in list(self.active):
                if w.conn in ready and (self._drain(w) or w.dead):
                    idle.append(w if not w.dead else self._lost(w, "crash"))
            now = time.monotonic()
            for w in list(self.active):
                if (d := self._deadline(w)) is not None and now >= d and not self._drain(w):
                    idle.append(self._lost(w, "timeout"))
        return [o for o in self.outcomes if o is not None]

    def _dispatch(self, idle: list[_Worker]) -> None:
        """Give pending chunks to idle workers. A replacement still starting up gets work only when
        no other worker is busy, so one timeout does not make the rest of the call wait for a boot."""
        idle.sort(key=lambda w: w.ready)
        while self.pending and idle and (idle[-1].ready or not self.active):
            self._send(idle.pop(), self.pending.popleft())

    def _send(self, w: _Worker, indices: list[int]) -> None:
        chunk = _Chunk(indices, self.pool.next_job())
        w.progress[0] = -1.0  # no unit started yet: no deadline until the worker stamps one
        self.active[w] = chunk
        # A dead worker cannot take it: its socket reads EOF and the chunk is handled as a crash.
        with contextlib.suppress(OSError):
            w.conn.send((chunk.job, [self.units[i] for i in indices]))

    def _deadline(self, w: _Worker) -> float | None:
        """Deadline of the unit `w` is on, or None if it has not started one of this chunk."""
        chunk = self.active[w]
        i = int(w.progress[0])  # read index first: the worker writes the start time before it
        start = w.progress[1]
        if i < chunk.done or i < 0:
            return None
        return start + self.pool.timeout * len(self.units[chunk.indices[i]][0])

    def _wait_seconds(self) -> float:
        now = time.monotonic()
        deadlines = [d for w in self.active if (d := self._deadline(w)) is not None]
        # A worker that has not stamped a unit yet is re-checked after one timeout.
        fallback = now + self.pool.timeout
        return max(0.0, min([*deadlines, fallback]) - now)

    def _drain(self, w: _Worker) -> bool:
        """Read every message `w` has sent; True once its chunk is complete. Sets w.dead on EOF."""
        chunk = self.active.get(w)
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] in ("ready", "init_error"):
                    w.note_startup(msg)  # an init failure is followed by EOF: handled as a crash
                    continue
                _, job, offset, results = msg
                if chunk is None or job != chunk.job:
                    continue
                for j, (status, payload) in enumerate(results, start=offset):
                    self.outcomes[chunk.indices[j]] = (
                        UnitOutcome("ok", values=payload) if status == "ok" else UnitOutcome("error", error=payload)
                    )
                chunk.done = offset + len(results)
                if msg[0] == "done":
                    del self.active[w]
                    return True
        except (EOFError, OSError):
            w.dead = True
        return False

    def _lost(self, w: _Worker, status: Literal["timeout", "crash"]) -> _Worker:
        """`w` was killed or died: resolve the unit it was on, requeue the rest, replace it."""
        chunk = self.active.pop(w)
        i = int(w.progress[0])
        stuck = i if i >= chunk.done else chunk.done
        if status == "crash":
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.process.wait(timeout=1)  # EOF comes first; give the exit code a moment to be reported
        error = ""
        if status == "crash":
            error = f"failed to start: {w.init_error}" if w.init_error else f"exit code {w.exitcode()}"
        if stuck < len(chunk.indices):
            self.outcomes[chunk.indices[stuck]] = UnitOutcome(status, error=error)
            rest = chunk.indices[chunk.done:stuck] + chunk.indices[stuck + 1:]
            if rest:
                self.pending.appendleft(rest)
        if status == "timeout":
            log.warning("reward worker passed its %.1f s per-sample deadline; killed, starting a replacement",
                        self.pool.timeout)
        else:
            log.warning("reward worker died (%s); starting a replacement", error)
        fresh = self.pool._replace(w, status)
        self.workers[self.workers.index(w)] = fresh
        return fresh
