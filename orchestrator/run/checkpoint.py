"""Checkpoints of the whole run state, written atomically.

Layout of `<checkpoint dir>/step-00000012/`:
    policy/           save_pretrained (safetensors) + tokenizer: loads with plain transformers
    trainer.pt        optimizer state (trainer.state_dict()), RNG states (torch, python, numpy) and, with
                      pipelined rollouts, the next step's samples drawn already
    state.json        step, data cursor, weight version, value checkpoint name and the critic it holds,
                      the step's step-log line (restored by a resume when a crash came before it was logged)
    config.yaml       the resolved run config
    COMPLETE          written last

Everything is written into a temporary sibling directory that is renamed into place only when
complete, so a crash never leaves a directory that looks like a checkpoint; `latest` also
requires the COMPLETE marker. The value service saves its critic under the same step name inside
its own checkpoint directory (Value.Save); a checkpoint left after a failure may instead refer to the
orchestrator's last verified value save (orchestrator/step/recovery.py), recorded with its counters.

The loop hands over a `Snapshot` (a frozen record of the run state) and `save` only writes files: it
never calls back into the loop or out over the network.

A run directory holds one run. `run.json` names it (its run id, written by the session when the run
starts); every checkpoint carries that id in its state.json, and retention deletes only checkpoints of
the run that just saved, never the one it just wrote. `latest` (a symlink) names the newest checkpoint
of the run. A fresh run refuses a directory that holds another run's files (`RunDirError`) unless it
was asked to resume the run or to remove them first (`claim_run_dir`).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from orchestrator.run.config import ConfigError, RunConfig, dump_config
from orchestrator.run.data import Cursor
from services.common.durable import fsync_path

MARKER = "COMPLETE"
PREFIX = "step-"
LATEST = "latest"  # symlink to the run's newest complete checkpoint
RUN_FILE = "run.json"  # the run id of the run that owns the directory
STEP_LOG = "steps.jsonl"
# What a run writes into its run_dir besides its checkpoints (the session, the local services, the value
# service's saves, experiment logging): a fresh run refuses a directory holding any of them, --overwrite
# removes exactly these. A new kind of run output adds its name here.
RUN_ENTRIES = (RUN_FILE, STEP_LOG, "services", "value-checkpoints", "metrics.jsonl", "tensorboard", "wandb", "eval.jsonl",
               "curves.png")


class Pretrained(Protocol):
    """A transformers model or tokenizer: what `save_pretrained` writes loads with plain transformers."""

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Snapshot:
    """The run state a checkpoint holds, built by the loop (Orchestrator.snapshot) and written by `save`.

    The policy and tokenizer are the live objects, written as they are when `save` runs: build a
    snapshot and save it before the next update.
    """

    step: int  # completed steps
    cursor: Cursor  # data position after those steps
    weight_version: int  # the version the generator serves
    policy: Pretrained  # the trainer's policy (save_pretrained, safetensors)
    tokenizer: Pretrained
    trainer_state: Any  # PolicyTrainer.state_dict(): optimizer, minibatch shuffle RNG, update count (None: none)
    rng: dict[str, Any]  # torch / python / numpy RNG states the resume continues from (rng_states())
    value_checkpoint: str | None  # the value service's save of the critic of this state (None: no critic saved)
    value_last_step_id: int | None  # TrainStep id that saved critic last applied
    log_line: str | None  # the step-log line of `step` (restored by a resume when a crash beat the log)
    config: RunConfig  # the resolved run config (config.yaml)
    pending_rollout: dict[str, Any] | None = None  # pipelined rollouts: the next step's samples (pipeline.Pending)


@dataclass(frozen=True)
class Restored:
    """Run state read back from a checkpoint."""

    path: Path
    step: int
    cursor: Cursor
    weight_version: int
    value_checkpoint: str | None
    value_last_step_id: int | None  # TrainStep id the saved critic last applied (None: not recorded)
    trainer_state: Any
    rng: dict[str, Any]
    log_line: str | None  # the step-log line of `step`
    pending_rollout: dict[str, Any] | None = None  # pipelined rollouts: the next step's samples, drawn already


def rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_states(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def step_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save(ckpt_dir: Path, snap: Snapshot, *, keep: int = 2) -> Path:
    """Write `snap` as `<ckpt_dir>/step-N` (N = snap.step), atomically; returns its path.

    Only files are written here: the value service already saved the critic the snapshot names.
    The checkpoint is stamped with the run id of the snapshot's run_dir (run.json). Afterwards the `keep`
    newest complete checkpoints of that run are kept (never the one just written among the deleted; other
    runs' checkpoints are never touched) and `latest` names the run's newest.
    """
    run_id = read_run_id(Path(snap.config.run_dir))
    name = step_name(snap.step)
    final = ckpt_dir / name
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    snap.policy.save_pretrained(tmp / "policy", safe_serialization=True)
    snap.tokenizer.save_pretrained(tmp / "policy")
    torch.save({"trainer": snap.trainer_state, "rng": snap.rng, "pending_rollout": snap.pending_rollout},
               tmp / "trainer.pt")
    meta = {"step": snap.step, "cursor": {"epoch": snap.cursor.epoch, "position": snap.cursor.position},
            "weight_version": snap.weight_version, "value_checkpoint": snap.value_checkpoint,
            "value_last_step_id": snap.value_last_step_id, "log_line": snap.log_line, "run_id": run_id}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    (tmp / "config.yaml").write_text(dump_config(snap.config))
    with (tmp / MARKER).open("w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a step re-done after a resume: replace the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(ckpt_dir)
    prune(ckpt_dir, keep=keep, protect=final, run_id=run_id)
    _point_latest(ckpt_dir, run_id)
    return final


def is_complete(path: Path) -> bool:
    """Whether `path` is a complete checkpoint (its COMPLETE marker, written last, is there)."""
    return (path / MARKER).is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def checkpoint_run_id(path: Path) -> str | None:
    """The run id a checkpoint is stamped with (None: written before run ids, or outside a session)."""
    try:
        return json.loads((path / "state.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def run_checkpoints(ckpt_dir: Path, run_id: str | None) -> list[Path]:
    """Complete checkpoints stamped with `run_id`, oldest first."""
    return [p for p in complete_checkpoints(ckpt_dir) if checkpoint_run_id(p) == run_id]


def latest(ckpt_dir: Path, *, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint; with `run_id`, the newest of that run."""
    found = complete_checkpoints(ckpt_dir) if run_id is None else run_checkpoints(ckpt_dir, run_id)
    return found[-1] if found else None


def prune(ckpt_dir: Path, *, keep: int, protect: Path | None = None, run_id: str | None = None) -> None:
    """Keep the `keep` newest complete checkpoints of run `run_id` (and `protect`), leaving every other run's
    alone; remove stale temporary directories."""
    for old in run_checkpoints(ckpt_dir, run_id)[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_dir.glob(".tmp-*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def _point_latest(ckpt_dir: Path, run_id: str | None) -> None:
    """Swap the `latest` symlink to the run's newest complete checkpoint (what --resume continues from)."""
    newest = latest(ckpt_dir, run_id=run_id)
    if newest is None:
        return
    tmp = ckpt_dir / f".latest-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(newest.name, target_is_directory=True)
        os.replace(tmp, ckpt_dir / LATEST)
    except OSError:  # a file system without symlinks: the step-N names remain
        tmp.unlink(missing_ok=True)


def read(path: Path) -> Restored:
    """The run state of a complete checkpoint (the policy itself loads from `path / 'policy'`)."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    meta = json.loads((path / "state.json").read_text())
    blob = torch.load(path / "trainer.pt", weights_only=False)
    return Restored(
        path=path, step=int(meta["step"]), cursor=Cursor(**meta["cursor"]), weight_version=int(meta["weight_version"]),
        value_checkpoint=meta.get("value_checkpoint"), value_last_step_id=meta.get("value_last_step_id"),
        trainer_state=blob["trainer"], rng=blob["rng"], log_line=meta.get("log_line"),
        pending_rollout=blob.get("pending_rollout"),
    )


def truncate_step_log(path: Path, last_step: int, restore: str | None = None) -> None:
    """Keep the step-log lines up to `last_step` (a resume starts there), each step once.

    `restore` is the line of `last_step` kept in its checkpoint: written back when a crash came between
    the checkpoint and the log line.
    """
    lines: dict[int, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip() and (n := int(json.loads(line)["step"])) <= last_step:
                lines.setdefault(n, line)
    if restore is not None and last_step not in lines and int(json.loads(restore)["step"]) == last_step:
        lines[last_step] = restore
    if lines or path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines[n] + "\n" for n in sorted(lines)))


class RunDirError(ConfigError):
    """run_dir (or checkpoint.dir) holds another run's files and the run was told neither to resume nor to overwrite."""


def read_run_id(run_dir: Path) -> str | None:
    """The id of the run that owns `run_dir` (its run.json), or None."""
    try:
        return str(json.loads((run_dir / RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def new_run_id() -> str:
    """Sortable and unique: the UTC start time and 6 random hex digits, e.g. 20261205-144541-3fa9c1."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _present(path: Path) -> bool:
    return path.is_symlink() or path.exists()


def run_files(run_dir: Path, ckpt_dir: Path) -> list[Path]:
    """A run's files in `run_dir` and `ckpt_dir` (RUN_ENTRIES, checkpoints, temporaries, `latest`): what
    --overwrite removes. Anything else in the directories is not a run's and is left alone."""
    found = [run_dir / name for name in RUN_ENTRIES if _present(run_dir / name)]
    if ckpt_dir.is_dir():
        ours = (PREFIX, ".tmp-", ".latest-")
        found += sorted(p for p in ckpt_dir.iterdir() if p.name.startswith(ours) or p.name == LATEST)
    return found


def describe_run(run_dir: Path, found: list[Path]) -> str:
    """One line naming what `found` (run_files) holds: run id, logged steps, checkpoints, service logs."""
    parts = []
    if run_id := read_run_id(run_dir):
        parts.append(f"run {run_id}")
    log = run_dir / STEP_LOG
    if log in found and log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        parts.append(f"{STEP_LOG} with {len(lines)} steps")
    ckpts = [p.name for p in found if p.name.startswith(PREFIX)]
    if ckpts:
        parts.append(f"checkpoints {', '.join(ckpts)}")
    services = run_dir / "services"
    if services in found and services.is_dir():
        parts.append(f"{len(list(services.glob('*.log')))} service logs in services/")
    shown = {RUN_FILE, STEP_LOG, "services", LATEST}
    parts += [p.name for p in found if p.parent == run_dir and p.name not in shown]
    return "; ".join(parts)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def claim_run_dir(run_dir: Path, ckpt_dir: Path, *, resume: bool, overwrite: bool,
                  log: Callable[[str], None]) -> tuple[str, Path | None]:
    """Make `run_dir` this run's: returns its run id and the checkpoint a resume continues from (None: step 0).

    Neither flag (a new run): the directories must hold no run's files, else RunDirError names them and the
    two ways on. `overwrite`: those files are removed first, and the log says which. `resume`: the run there
    goes on under its own id from its newest complete checkpoint. run.json records the id and each start.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: --resume continues the run in run_dir, "
                          "--overwrite deletes its files and starts a new one")
    found = run_files(run_dir, ckpt_dir)
    if found and not resume:
        what = describe_run(run_dir, found)
        where = f"run_dir {run_dir}" + (f" / checkpoint.dir {ckpt_dir}" if ckpt_dir != run_dir / "checkpoints" else "")
        if not overwrite:
            raise RunDirError(
                f"{where} holds another run ({what}); a new run does not write into it. Continue that run with "
                "--resume (add --set steps=N to go past its last step), delete its files and start over with "
                "--overwrite, or give this run its own directory (--set run_dir=...)")
        for path in found:
            _remove(path)
        log(f"--overwrite: removed the previous run's files from {where} ({what})")
    run_id = read_run_id(run_dir) if resume else None
    start = latest(ckpt_dir, run_id=run_id) if resume else None
    run_id = run_id or (checkpoint_run_id(start) if start else None) or new_run_id()
    record = {"run_id": run_id, "created": _now(), "starts": []}
    if resume and (run_dir / RUN_FILE).is_file():
        record = {**record, **json.loads((run_dir / RUN_FILE).read_text())}
    step = int(start.name[len(PREFIX):]) if start else 0
    record["starts"] = [*record.get("starts", []), {"at": _now(), "step": step,
                                                      "how": "resume" if resume else "overwrite" if found else "new"}]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return run_id, start


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
