"""Checkpoints of the whole run state, written atomically.

Layout of `<checkpoint dir>/step-00000012/`:
    policy/           save_pretrained (safetensors) + tokenizer: loads with plain transformers
    trainer.pt        optimizer state (trainer.state_dict()) and RNG states (torch, python, numpy)
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
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from orchestrator.run.config import RunConfig, dump_config
from orchestrator.run.data import Cursor

MARKER = "COMPLETE"
PREFIX = "step-"


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


def rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_states(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def step_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(ckpt_dir: Path, snap: Snapshot, *, keep: int = 2) -> Path:
    """Write `snap` as `<ckpt_dir>/step-N` (N = snap.step), atomically; returns its path.

    Only files are written here: the value service already saved the critic the snapshot names.
    Afterwards the `keep` newest complete checkpoints are kept, never the one just written among the deleted.
    """
    name = step_name(snap.step)
    final = ckpt_dir / name
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    snap.policy.save_pretrained(tmp / "policy", safe_serialization=True)
    snap.tokenizer.save_pretrained(tmp / "policy")
    torch.save({"trainer": snap.trainer_state, "rng": snap.rng}, tmp / "trainer.pt")
    meta = {"step": snap.step, "cursor": {"epoch": snap.cursor.epoch, "position": snap.cursor.position},
            "weight_version": snap.weight_version, "value_checkpoint": snap.value_checkpoint,
            "value_last_step_id": snap.value_last_step_id, "log_line": snap.log_line}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    (tmp / "config.yaml").write_text(dump_config(snap.config))
    with (tmp / MARKER).open("w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a step re-done after a resume: replace the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    prune(ckpt_dir, keep=keep, protect=final)
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


def latest(ckpt_dir: Path) -> Path | None:
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def prune(ckpt_dir: Path, *, keep: int, protect: Path | None = None) -> None:
    """Keep the `keep` newest complete checkpoints (and `protect`); remove stale temporary directories."""
    for old in complete_checkpoints(ckpt_dir)[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_dir.glob(".tmp-*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


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
