"""Durable writes: what the checkpoints of the orchestrator and of the value service share."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path. A directory's fsync makes a rename inside it durable,
    so a checkpoint renamed into place survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
