"""Critic checkpoints inside the value service's checkpoint directory.

A checkpoint is a directory `<checkpoint_dir>/<name>/` holding
- `critic.safetensors`: trunk and head weights (`trunk.*`, `head.*`), safetensors;
- `optimizer.pt`: the AdamW state dict (torch.save; read back with weights_only=True);
- `meta.json`: {"format": "quartet-value-critic", "version": 1, "steps_trained", "last_step_id", ...}.

Names come from the network, so `resolve_name` refuses anything that would land outside the
checkpoint directory (absolute paths, "..", a symlink pointing out) with PermissionDenied, and
names the filesystem cannot hold (a component over NAME_MAX, a path over PATH_MAX, counting the
temporary names written beside it) with InvalidArgument, before touching the filesystem.

Writes are atomic: everything goes to a hidden temporary directory next to the target, which is then
renamed into place, so a crash leaves either the old checkpoint or the new one, never half of one
(at worst an orphaned `.<name>.tmp-*` or `.<name>.old-*` directory). An existing target is replaced
only if it is itself a critic checkpoint: a name must never delete a folder of other checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load_file, save_file

from services.common.durable import fsync_path
from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied

WEIGHTS = "critic.safetensors"
OPTIMIZER = "optimizer.pt"
META = "meta.json"
FORMAT = "quartet-value-critic"

# Linux limits, in bytes of the encoded name. Writes go through `.<last>.tmp-<8 hex>/critic.safetensors`
# (and `.<last>.old-<8 hex>`), so the last component and the whole path need room for those too.
NAME_MAX = 255
PATH_MAX = 4096  # includes the terminating NUL
_TMP_EXTRA = len(".") + len(".tmp-") + 8
_LONGEST_FILE = max(len(WEIGHTS), len(OPTIMIZER), len(META))


@dataclass(frozen=True)
class CheckpointMeta:
    steps_trained: int
    last_step_id: int
    model_path: str


def resolve_name(root: Path | None, name: str) -> Path:
    """The directory a checkpoint name stands for, guaranteed to lie strictly inside `root`.

    Raises:
        FailedPrecondition: the service has no checkpoint directory.
        InvalidArgument: empty name, NUL byte, or a name that is the checkpoint directory itself.
        PermissionDenied: absolute path, "..", or a path that resolves (through symlinks) outside.
    """
    if root is None:
        raise FailedPrecondition("this value service has no checkpoint directory; start it with --checkpoint-dir")
    if not name:
        raise InvalidArgument("name", "empty; give a relative path such as 'step-000100'")
    if "\x00" in name:
        raise InvalidArgument("name", "contains a NUL byte")
    pure = PurePosixPath(name)
    if pure.is_absolute() or os.path.isabs(name) or name.startswith("~"):
        raise PermissionDenied(f"checkpoint name {name!r} is absolute; use a path relative to the checkpoint directory")
    if ".." in pure.parts or "\\" in name:
        raise PermissionDenied(f"checkpoint name {name!r} may not contain '..' or backslashes")
    base = root.resolve()
    _check_lengths(base, pure)
    target = (base / pure).resolve()  # follows symlinks, so a link pointing out is caught below
    if target == base:
        raise InvalidArgument("name", f"{name!r} names the checkpoint directory itself; add a sub-directory name")
    if base not in target.parents:
        raise PermissionDenied(f"checkpoint name {name!r} resolves outside the checkpoint directory")
    return target


def _check_lengths(base: Path, pure: PurePosixPath) -> None:
    """InvalidArgument("name") for a name no filesystem here can hold; touches nothing."""
    parts = [os.fsencode(p) for p in pure.parts]
    for i, part in enumerate(parts):
        room = NAME_MAX - (_TMP_EXTRA if i == len(parts) - 1 else 0)
        if len(part) > room:
            which = "its last component" if i == len(parts) - 1 else f"component {i + 1}"
            raise InvalidArgument("name", f"{which} is {len(part)} bytes; the limit is {room} "
                                  f"(NAME_MAX={NAME_MAX}, less room for the temporary name written beside it)")
    longest = len(os.fsencode(str(base / pure))) + _TMP_EXTRA + 1 + _LONGEST_FILE
    if longest >= PATH_MAX:
        raise InvalidArgument("name", f"the checkpoint's files would have paths of {longest} bytes inside the "
                              f"checkpoint directory; the limit is PATH_MAX={PATH_MAX} - 1: use a shorter name")


def is_checkpoint(path: Path) -> bool:
    try:
        return json.loads((path / META).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_checkpoint(target: Path, weights: dict[str, torch.Tensor], optimizer_state: dict,
                     meta: CheckpointMeta) -> None:
    """Write a checkpoint to `target` (already resolved) atomically, replacing an older checkpoint there."""
    if target.exists() and not is_checkpoint(target):
        raise FailedPrecondition(
            f"{target.name!r} exists and is not a value checkpoint; choose another name (it is not overwritten)")
    parent = target.parent
    tag = uuid.uuid4().hex[:8]
    tmp = parent / f".{target.name}.tmp-{tag}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except (FileExistsError, NotADirectoryError) as e:
        # A component of the name is an existing file (say "<ckpt>/meta.json/inner"): the caller's
        # name cannot be a directory here, which a different name fixes.
        where = Path(os.fsdecode(e.filename)).name if e.filename else parent.name  # no host paths in errors
        raise FailedPrecondition(f"cannot create the checkpoint directory for {target.name!r}: {where!r} on its "
                                 f"path is a file, not a directory ({e.strerror}); choose another name") from None
    except OSError as e:
        raise FailedPrecondition(f"cannot create the checkpoint directory for {target.name!r}: {e.strerror}") from None
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
        torch.save(optimizer_state, tmp / OPTIMIZER)
        payload = {"format": FORMAT, "version": 1, "steps_trained": meta.steps_trained,
                   "last_step_id": meta.last_step_id, "model_path": meta.model_path}
        (tmp / META).write_text(json.dumps(payload, indent=2))
        for f in (WEIGHTS, OPTIMIZER, META):
            fsync_path(tmp / f)
        if target.exists():
            old = parent / f".{target.name}.old-{tag}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_checkpoint(target: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict, CheckpointMeta]:
    """(weights, optimizer state, meta) of the checkpoint at `target`; InvalidArgument if there is none."""
    if not is_checkpoint(target):
        raise InvalidArgument("name", f"no value checkpoint named {target.name!r} in the checkpoint directory")
    raw = json.loads((target / META).read_text())
    meta = CheckpointMeta(int(raw["steps_trained"]), int(raw["last_step_id"]), str(raw.get("model_path", "")))
    weights = load_file(str(target / WEIGHTS), device=str(device))
    optimizer_state = torch.load(target / OPTIMIZER, map_location=device, weights_only=True)
    return weights, optimizer_state, meta


def check_compatible(current: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], name: str) -> None:
    """FailedPrecondition unless `loaded` has exactly the names, shapes and dtypes of `current`."""
    missing = sorted(set(current) - set(loaded))
    extra = sorted(set(loaded) - set(current))
    if missing or extra:
        raise FailedPrecondition(
            f"checkpoint {name!r} does not fit this critic: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in current.items():
        w = loaded[k]
        if w.shape != v.shape or w.dtype != v.dtype:
            raise FailedPrecondition(
                f"checkpoint {name!r} does not fit this critic: {k} is {w.dtype}{list(w.shape)}, "
                f"expected {v.dtype}{list(v.shape)}")
