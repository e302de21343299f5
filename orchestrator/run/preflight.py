"""Checks of a run config against the machine, before any service starts: every problem at once, in seconds.

The config itself is already typed and validated (orchestrator.run.config); what it points at is not:
model directories (config.json and tokenizer readable, no weights loaded), the dataset (exists, its first
rows parse, the configured columns present; for a real-data kind every row through the loader and the
first prompt through the policy's tokenizer), the metrics port (free), the output directories
(writable), the trainer device, the remote endpoints' token files, the report_to packages. Each problem
names the config field and says what to change; `check` returns them all, `require` raises one
ConfigError listing them.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.run.config import ConfigError, RunConfig
from orchestrator.run.reporting import missing_packages

ROWS_CHECKED = 1000  # dataset rows parsed up front; a bad line further down is found when the run loads it
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Problem:
    """One thing to fix: the config field it is about, and what is wrong and what to change."""

    field: str
    message: str

    def __str__(self) -> str:
        return self.message if self.message.startswith(self.field) else f"{self.field}: {self.message}"


class PreflightError(ConfigError):
    """Problems found before start-up; the message lists every one, one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) with the run config:\n" + "\n".join(f"  {p}" for p in problems))


def check(cfg: RunConfig, *, models: bool = True, dataset: bool = True) -> list[Problem]:
    """Every problem found; `models` / `dataset` False skip those checks (the demo makes both later)."""
    checks: list[Callable[[RunConfig], Iterator[Problem]]] = [_outputs, _ports, _device, _endpoints, _reporting]
    if models:
        checks.insert(0, _models)
    if dataset:
        checks.insert(1 if models else 0, _dataset)
    return [p for fn in checks for p in fn(cfg)]


def require(cfg: RunConfig, **kwargs: bool) -> None:
    """Raise a PreflightError listing every problem `check` finds."""
    problems = check(cfg, **kwargs)
    if problems:
        raise PreflightError(problems)


# --- models ----------------------------------------------------------------------------------------


def _model_dirs(cfg: RunConfig) -> dict[str, str]:
    """field -> directory of every checkpoint this process or its local services load (unset: the policy's)."""
    m = cfg.models
    dirs = {"models.policy": m.policy}
    if cfg.services.local and cfg.uses_reference and m.reference is not None:
        dirs["models.reference"] = m.reference
    if cfg.services.local and cfg.uses_value and m.value is not None:
        dirs["models.value"] = m.value
    return dirs


def _models(cfg: RunConfig) -> Iterator[Problem]:
    seen: dict[str, list[Problem]] = {}
    for field, path in _model_dirs(cfg).items():
        if path not in seen:
            seen[path] = list(_model_dir(path))
        for p in seen[path]:
            yield Problem(field, p.message)


def _model_dir(path: str) -> Iterator[Problem]:
    p = Path(path).expanduser()
    fix = "set it to a local Hugging Face checkpoint directory (config.json and tokenizer files)"
    if not p.is_dir():
        yield Problem("", f"directory {path!r} does not exist; {fix}")
        return
    from transformers import AutoConfig, AutoTokenizer  # reads JSON files only: no weights are loaded

    if bad := _load_error(AutoConfig, p, "config.json is missing or unreadable"):
        yield Problem("", f"{path!r}: {bad}; {fix}")
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        yield Problem("", f"{path!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); {fix}")
        return
    if bad := _load_error(AutoTokenizer, p, "the tokenizer cannot be loaded"):
        yield Problem("", f"{path!r}: {bad}; {fix}")


def _load_error(auto_class: Any, p: Path, what: str) -> str | None:
    """None when ``auto_class.from_pretrained(p)`` (local files only) succeeds, else ``what`` and the
    first line of its error: any exception, since a broken directory can fail in many ways."""
    try:
        auto_class.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        return f"{what} ({_first_line(e)})"
    return None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# --- dataset ---------------------------------------------------------------------------------------


def _loaded_dataset(cfg: RunConfig) -> Iterator[Problem]:
    """The real-data loader over every row without a tokenizer, then the first prompt through the
    policy's tokenizer (chat: on or a system prompt with a tokenizer that has no chat template)."""
    from orchestrator.run.datasets import DatasetError, load_dataset, render_prompt

    spec = cfg.dataset.spec()
    try:
        loaded = load_dataset(spec.model_copy(update={"chat": "off", "system_prompt": None}))
        try:
            from services.common.hf import load_tokenizer

            tokenizer = load_tokenizer(cfg.models.policy)
        except Exception:  # an unreadable model directory is the model check's problem
            return
        render_prompt(loaded.train[0].question, tokenizer, chat=spec.chat, system_prompt=spec.system_prompt)
    except DatasetError as e:
        yield Problem("dataset", str(e))


def _dataset(cfg: RunConfig) -> Iterator[Problem]:
    d = cfg.dataset
    if d.kind != "prompts":
        yield from _loaded_dataset(cfg)
        return
    path = Path(d.path).expanduser()
    if not path.is_file():
        yield Problem("dataset.path", f"{d.path!r} does not exist; point it at a local .jsonl or .parquet file")
        return
    fmt = d.format if d.format != "auto" else ("parquet" if path.suffix == ".parquet" else "jsonl")
    columns = [d.prompt_column, *d.metadata_columns]
    if fmt == "parquet":
        yield from _parquet_columns(path, columns)
        return
    rows = 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.strip())
                except json.JSONDecodeError as e:
                    yield Problem("dataset.path", f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                                  "fix or remove that line (one JSON object per line)")
                    return
                if not isinstance(row, dict):
                    yield Problem("dataset.path", f"{path}:{lineno}: a JSON {type(row).__name__}, not an object; "
                                  "write one JSON object per line")
                    return
                missing = [c for c in columns if c not in row]
                if missing:
                    yield _missing_columns(f"{path}:{lineno}", missing, sorted(row))
                    return
                rows += 1
                if rows >= ROWS_CHECKED:
                    break
    except (OSError, UnicodeDecodeError) as e:
        yield Problem("dataset.path", f"{path}: cannot be read ({e}); give a readable UTF-8 jsonl file")
        return
    if rows == 0:
        yield Problem("dataset.path", f"{path} holds no rows; give a file with one JSON object per line")


def _parquet_columns(path: Path, columns: list[str]) -> Iterator[Problem]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        yield Problem("dataset.format", "parquet needs pyarrow: pip install pyarrow, or convert the file to jsonl")
        return
    try:
        names = pq.read_schema(path).names
    except Exception as e:
        yield Problem("dataset.path", f"{path}: not a readable parquet file ({_first_line(e)})")
        return
    missing = [c for c in columns if c not in names]
    if missing:
        yield _missing_columns(str(path), missing, sorted(names))


def _missing_columns(where: str, missing: list[str], present: list[str]) -> Problem:
    return Problem("dataset.prompt_column / dataset.metadata_columns",
                   f"{where} has no column(s) {missing}; its columns are {present}: set dataset.prompt_column and "
                   "dataset.metadata_columns to columns the file has")


# --- ports, outputs, device, endpoints, reporting ---------------------------------------------------


def _ports(cfg: RunConfig) -> Iterator[Problem]:
    port = cfg.metrics_port
    if not port:  # None: off; 0: any free port
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in cfg.metrics_host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds it
            s.bind((cfg.metrics_host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            why = f"port {port} on {cfg.metrics_host} is already in use"
        else:
            why = f"cannot listen on {cfg.metrics_host}:{port} ({e.strerror or e})"
        yield Problem("metrics_port", f"{why}; set metrics_port to a free port, 0 (any free port) or null (off)"
                      + ("" if e.errno == errno.EADDRINUSE else ", or fix metrics_host"))


def _outputs(cfg: RunConfig) -> Iterator[Problem]:
    dirs = {"run_dir": Path(cfg.run_dir)}
    if cfg.checkpoint.dir:
        dirs["checkpoint.dir"] = Path(cfg.checkpoint.dir)
    for field, path in dirs.items():
        why = _unwritable(path.expanduser())
        if why:
            yield Problem(field, f"{str(path)!r} {why}; choose a directory this user can write")


def _unwritable(path: Path) -> str | None:
    """Why `path` cannot be created or written as a directory, or None. Nothing is created."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "has no existing parent"
        probe = probe.parent
    if not probe.is_dir():
        return "is a file" if probe == path else f"cannot be created: {str(probe)!r} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return "is not writable" if probe == path else f"cannot be created: {str(probe)!r} is not writable"
    return None


def _device(cfg: RunConfig) -> Iterator[Problem]:
    from services.common.hf import resolve_device, resolve_dtype

    try:
        device = resolve_device(cfg.models.device, field="models.device")
        resolve_dtype(cfg.models.dtype, device=device, field="models.dtype")
    except ValueError as e:
        yield Problem("models.dtype" if str(e).startswith("models.dtype") else "models.device", str(e))


def _endpoints(cfg: RunConfig) -> Iterator[Problem]:
    s = cfg.services
    named = {"services.generator": s.generator, "services.reference": s.reference, "services.value": s.value,
             **{f"services.rewards.{i}": r for i, r in enumerate(s.rewards)}}
    for field, ep in named.items():
        if ep is None:
            continue
        for resolve in (ep.call_token, ep.admin_call_token):
            try:
                resolve()
            except ConfigError as e:
                yield Problem(field, str(e))
                break


def _reporting(cfg: RunConfig) -> Iterator[Problem]:
    for message in missing_packages(cfg.report_to):
        yield Problem("report_to", message.removeprefix("report_to "))


__all__ = ["PreflightError", "Problem", "check", "require"]
