"""The worker-process side of the reward pool: build the scorer once, then score chunks of units.

Runs in a fresh interpreter started by `verify._Worker` (`python -c "...worker_entry(fd, fd)"`).
Imports only the standard library, this package's light modules, and the scorer named by the
spec (a built-in rule or the user's plugin): never torch or gRPC.
"""

from __future__ import annotations

import importlib
import logging
import mmap
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

#: One unit of work: (prompts, completions, metadata), each a list of the same length n >= 1.
Unit = tuple[list[str], list[str], list[dict[str, str]]]

PROGRESS_BYTES = 16  # two doubles: [unit index (-1 = none started), start time (time.monotonic)]


@dataclass(frozen=True)
class ScorerSpec:
    """What a worker builds at start-up. Only names and plain values: nothing is pickled from a request.

    factory: "package.module:function" called once in the worker with `settings`; it returns the
        scorer, a callable (prompts, completions, metadata) -> list of floats for one unit.
    sys_path: directories prepended to sys.path in the worker before importing (plugin_path).
    """

    factory: str
    settings: dict[str, Any] = field(default_factory=dict)
    sys_path: tuple[str, ...] = ()


def import_target(target: str, *, what: str) -> Callable[..., Any]:
    """Resolve "module:function" to the callable; errors say what to change."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {target!r} must be 'module:function', e.g. 'my_rewards:score'")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"{what} {target!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(obj):
        raise ValueError(f"{what} {target!r} is a {type(obj).__name__}, not a function")
    return obj


def build_scorer(spec: ScorerSpec) -> Callable[[list[str], list[str], list[dict[str, str]]], Any]:
    """Import and build the scorer described by `spec` (in a worker, or in tests directly)."""
    for p in reversed(spec.sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    return import_target(spec.factory, what="scorer factory")(spec.settings)


def _evaluate(scorer: Callable[..., Any], unit: Unit) -> tuple[Any, ...]:
    try:
        out = scorer(*unit)
        return ("ok", tuple(float(v) for v in out))
    except BaseException as e:  # a plugin's SystemExit must not end the worker silently either
        return ("error", f"{type(e).__name__}: {e}")


def _worker_main(conn: Connection, progress: memoryview) -> None:
    """Worker loop: build the scorer, then run chunks, stamping progress before each unit."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    spec, flush_seconds = conn.recv()
    try:
        scorer = build_scorer(spec)
    except BaseException as e:
        conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        job, units = msg
        sent, results, last = 0, [], time.monotonic()
        for i, unit in enumerate(units):
            progress[1] = time.monotonic()  # start first, index second: see verify._Run._deadline
            progress[0] = float(i)
            results.append(_evaluate(scorer, unit))
            if time.monotonic() - last > flush_seconds and i + 1 < len(units):
                conn.send(("part", job, sent, results))
                sent, results, last = sent + len(results), [], time.monotonic()
        conn.send(("done", job, sent, results))


def worker_entry(conn_fd: int, progress_fd: int) -> None:
    """Entry point of a worker process (see `verify._Worker`)."""
    progress = memoryview(mmap.mmap(progress_fd, PROGRESS_BYTES)).cast("d")
    _worker_main(Connection(conn_fd), progress)

